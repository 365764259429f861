"""The autoencoder between images and the space the DiT models: the KL-f8 VAE of Stable
Diffusion (through diffusers' `AutoencoderKL`) or `pixel`, the identity, for pixel-space and
offline experiments. Both sit behind one interface:

    ae = build_autoencoder("sd-ema")              # or "sd-mse", a hub id, a local dir, "pixel"
    z = ae.encode(images)                          # images in [-1, 1], (N, 3, H, W) -> (N, C, H/f, W/f)
    images = ae.decode(z)                          # back to [-1, 1] (approximately)

Latents are scaled by `scale_factor` (0.18215 for the SD VAEs) so they have roughly unit variance.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

# Short names for the two VAEs the DiT paper used; anything else is a hub id or a local path.
KNOWN_VAES = {
    "sd-ema": "stabilityai/sd-vae-ft-ema",
    "sd-mse": "stabilityai/sd-vae-ft-mse",
}
SD_SCALE_FACTOR = 0.18215


class AutoencoderUnavailable(RuntimeError):
    """The VAE weights could not be found locally nor downloaded."""


class Autoencoder(nn.Module):
    """Common interface. Subclasses set `latent_channels`, `downsample_factor`, `scale_factor`."""

    name: str
    latent_channels: int
    downsample_factor: int
    scale_factor: float

    def latent_size(self, image_size: int) -> int:
        """Side of the latent grid for square images of side `image_size`."""
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the {self.name} autoencoder's "
                f"downsampling factor {self.downsample_factor}"
            )
        return image_size // self.downsample_factor

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, *unscaled*: (N, C, h, w) each."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents: a posterior sample (the reference's choice for
        training), or its mean with `sample=False`."""
        mean, std = self.encode_moments(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return mean * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What to store in a checkpoint to rebuild (and check) this autoencoder."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "scale_factor": self.scale_factor,
        }


class PixelAutoencoder(Autoencoder):
    """Identity: the model works on the [-1, 1] images themselves."""

    def __init__(self):
        super().__init__()
        self.name = "pixel"
        self.latent_channels = 3
        self.downsample_factor = 1
        self.scale_factor = 1.0

    def encode_moments(self, images):
        return images, torch.zeros_like(images)

    def encode(self, images, generator=None, sample=True):
        return images

    def decode(self, latents):
        return latents


class VAEAutoencoder(Autoencoder):
    """diffusers `AutoencoderKL`; frozen, in eval mode."""

    def __init__(self, vae: nn.Module, name: str, scale_factor: float):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale_factor = float(scale_factor)

    @torch.no_grad()
    def encode_moments(self, images):
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def decode(self, latents):
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.scale_factor).sample


def _load_vae(source: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if Path(source).expanduser().is_dir():
        return AutoencoderKL.from_pretrained(str(Path(source).expanduser()), torch_dtype=dtype)
    # A hub id is "org/name"; anything else that names a place on disk must exist.
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).expanduser().exists():
        raise AutoencoderUnavailable(
            f"autoencoder directory {source!r} does not exist or is not a directory: pass a folder "
            "written by AutoencoderKL.save_pretrained, or a hub id such as stabilityai/sd-vae-ft-ema"
        )
    # A hub id: the local cache first (no network), then a download unless offline mode is on.
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
    except Exception as cached_err:  # noqa: BLE001 - diffusers raises several types here
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            raise AutoencoderUnavailable(_unavailable_message(source, cached_err)) from cached_err
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001
        raise AutoencoderUnavailable(_unavailable_message(source, err)) from err


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection. Checked before a download so that an
    offline machine fails at once instead of after huggingface_hub's retries (~25 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable_message(source: str, err: Exception) -> str:
    return (
        f"cannot load the autoencoder {source!r}: it is not in the local Hugging Face cache and "
        f"could not be downloaded ({type(err).__name__}). Either download it on a machine with "
        f"network access (`huggingface-cli download {source}`, then copy the cache or set HF_HOME), "
        f"or save it with `AutoencoderKL.from_pretrained({source!r}).save_pretrained(DIR)` and pass "
        f"vae=DIR (a local directory); set HF_HUB_OFFLINE=1 to skip network attempts."
    )


def build_autoencoder(
    name: str,
    scale_factor: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Autoencoder:
    """`"pixel"`, `"sd-ema"`, `"sd-mse"`, a hub id (`org/name`) or a local `save_pretrained` dir.

    `scale_factor` defaults to the VAE config's `scaling_factor` (0.18215 for the SD VAEs).
    """
    if name == "pixel":
        return PixelAutoencoder()
    source = KNOWN_VAES.get(name, name)
    vae = _load_vae(source, dtype)
    if scale_factor is None:
        scale_factor = getattr(vae.config, "scaling_factor", None) or SD_SCALE_FACTOR
    return VAEAutoencoder(vae, name, scale_factor).to(device)
