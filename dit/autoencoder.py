"""The autoencoder between images and the space the DiT models: the KL-f8 VAE of Stable
Diffusion (through diffusers' `AutoencoderKL`) or `pixel`, the identity, for pixel-space and
offline experiments. Both sit behind one interface:

    ae = build_autoencoder("sd-ema")              # or "sd-mse", a hub id, a local dir, "pixel"
    z = ae.encode(images)                          # images in [-1, 1], (N, 3, H, W) -> (N, C, H/f, W/f)
    images = ae.decode(z)                          # back to [-1, 1] (approximately)

The latent space the model sees is the autoencoder's output z under one affine map (diffusers'
convention, so SD3/FLUX and per-channel-normalised VAE configs mean what they say):

    latents = (z - shift_factor - latents_mean[c]) * scale_factor / latents_std[c]

`scale_factor` is 0.18215 for the SD VAEs (no shift, no per-channel stats: `z * 0.18215`, exactly
as before); `shift_factor` and the per-channel stats come from the VAE's config.json when it has
them, or from the vae config keys (`latent_stats` measures them on a cache or on images).
diffusers classes: `AutoencoderKL` and `AsymmetricAutoencoderKL` (posterior), `AutoencoderDC` and
`AutoencoderTiny` (deterministic: the "posterior" is the encoding with std 0); the class is read
from the directory's or hub model's config.json `_class_name`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn


class _NoAccelerateNotice(logging.Filter):
    """Drops diffusers' advice to install `accelerate`, which its `from_pretrained` logs at every
    load when accelerate is missing ("Cannot initialize model with low cpu memory usage because
    `accelerate` was not found ..."): loading then takes diffusers' ordinary path, which is right
    for models of this size, so the notice said nothing on every run. Only that message, only on
    the logger that writes it (diffusers.models.modeling_utils); diffusers' other warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("`accelerate` was not found" in message and "low cpu memory usage" in message)


# Installed when this module is imported, before anything here (or dit.io.export) loads a diffusers model.
_ACCELERATE_NOTICE_FILTER = _NoAccelerateNotice()
logging.getLogger("diffusers.models.modeling_utils").addFilter(_ACCELERATE_NOTICE_FILTER)


# Short names for the two VAEs the DiT paper used; anything else is a hub id or a local path.
KNOWN_VAES = {
    "sd-ema": "stabilityai/sd-vae-ft-ema",
    "sd-mse": "stabilityai/sd-vae-ft-mse",
}
SD_SCALE_FACTOR = 0.18215
DEFAULT_CLASS = "AutoencoderKL"  # a config.json without `_class_name` (and every spec without "class")

# The diffusers classes that fit `encode_moments`/`decode` on (N, 3, H, W) images: how their
# `encode(x)` output gives the latent ("latent_dist": a Gaussian posterior; otherwise the attribute
# holding a deterministic encoding), and the config key whose length - 1 is log2 of the
# downsampling (each block but the last halves the side).
ENCODINGS = {
    "AutoencoderKL": "latent_dist",
    "AsymmetricAutoencoderKL": "latent_dist",
    "AutoencoderDC": "latent",
    "AutoencoderTiny": "latents",
}
_DOWN_BLOCKS = {
    "AutoencoderKL": "block_out_channels",
    "AsymmetricAutoencoderKL": "down_block_out_channels",
    "AutoencoderDC": "encoder_block_out_channels",
    "AutoencoderTiny": "encoder_block_out_channels",
}


class AutoencoderUnavailable(RuntimeError):
    """The VAE weights could not be found locally nor downloaded."""


def downsample_factor_from_config(config: Mapping) -> Optional[int]:
    """The spatial downsampling of a diffusers autoencoder from its config (config.json as a
    dict, or `model.config`); None for a class this module does not know."""
    key = _DOWN_BLOCKS.get(config.get("_class_name") or DEFAULT_CLASS)
    blocks = config.get(key) if key else None
    return 2 ** (len(blocks) - 1) if blocks else None


# --------------------------------------------------------------------------------------
# The latent transform: autoencoder output z <-> what the model sees
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentTransform:
    """latents = (z - shift - mean[c]) * scale / std[c]; `invert` undoes it. Terms left at their
    neutral value are skipped, not computed, so SD's `z * 0.18215` stays bitwise what it was.
    Works on (C, h, w) items and (N, C, h, w) batches alike."""

    scale: float
    shift: float = 0.0
    mean: Optional[tuple] = None  # per channel, in z's units (after the shift)
    std: Optional[tuple] = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the latent scale_factor must be a positive number, got {self.scale}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"latents_mean has {len(self.mean)} channels but latents_std has {len(self.std)}: "
                             "give one value per latent channel in both")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"latents_std must be positive numbers, got {list(self.std)}")

    def check_channels(self, channels: int, where: str = "the autoencoder") -> "LatentTransform":
        for key, values in (("latents_mean", self.mean), ("latents_std", self.std)):
            if values is not None and len(values) != channels:
                raise ValueError(f"{key} has {len(values)} values but {where} has {channels} latent channels: "
                                 f"give one per channel (measure them with `python -m dit.latent_stats`)")
        return self

    @staticmethod
    def _per_channel(values: tuple, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)  # (C, 1, 1)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.shift:
            z = z - self.shift
        if self.mean is not None:
            z = z - self._per_channel(self.mean, z)
        z = z * self.scale
        if self.std is not None:
            z = z / self._per_channel(self.std, z)
        return z

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        if self.std is not None:
            latents = latents * self._per_channel(self.std, latents)
        latents = latents / self.scale
        if self.mean is not None:
            latents = latents + self._per_channel(self.mean, latents)
        if self.shift:
            latents = latents + self.shift
        return latents

    def to_dict(self) -> dict:
        """The spec keys; the neutral terms are left out (a spec without them means no shift and
        no per-channel stats, as in every checkpoint and cache written before they existed)."""
        out = {"scale_factor": self.scale}
        if self.shift:
            out["shift_factor"] = self.shift
        if self.mean is not None:
            out["latents_mean"] = list(self.mean)
        if self.std is not None:
            out["latents_std"] = list(self.std)
        return out

    @classmethod
    def from_spec(cls, spec: Mapping) -> "LatentTransform":
        """From `Autoencoder.to_dict()` as stored in a checkpoint or a cache's meta.json."""
        mean, std = spec.get("latents_mean"), spec.get("latents_std")
        return cls(float(spec["scale_factor"]), float(spec.get("shift_factor") or 0.0),
                   tuple(float(v) for v in mean) if mean is not None else None,
                   tuple(float(v) for v in std) if std is not None else None)


def latent_stats(moments: Iterable[tuple[torch.Tensor, torch.Tensor]], shift: float = 0.0) -> tuple[list, list]:
    """Per-channel mean and std of the latents z - shift that training draws, from batches of
    unscaled posterior moments (mean, std), each (N, C, h, w) or (C, h, w): exact moments of the
    mixture of Gaussians, no sampling noise (var = E[mean^2] + E[std^2] - E[mean]^2; std 0 for a
    deterministic autoencoder). Give the result as vae.latents_mean / vae.latents_std."""
    total = None
    for mean, std in moments:
        mean, std = mean.double(), std.double()
        if mean.dim() == 3:
            mean, std = mean[None], std[None]
        dims = (0, 2, 3)
        sums = torch.stack([torch.full_like(mean[0, :, 0, 0], mean[:, 0].numel()), (mean - shift).sum(dims),
                            ((mean - shift) ** 2).sum(dims), (std ** 2).sum(dims)])  # (4, C)
        total = sums if total is None else total + sums
    if total is None:
        raise ValueError("no latents to measure: the cache or image set is empty")
    count, s1, s2, v = total
    m = s1 / count
    sd = ((s2 + v) / count - m ** 2).clamp_min(0).sqrt()
    if not bool((sd > 0).all()):
        raise ValueError(f"latent channel(s) {torch.nonzero(sd == 0).flatten().tolist()} are constant over the "
                         "measured set: measure on more (and more varied) images")
    return m.tolist(), sd.tolist()


def guided_channels_warning(guided, latent_channels: int) -> Optional[str]:
    """The warning for `guided_channels=3` (the paper's choice for SD's 4-channel latents) on a
    latent space with more channels than 3 and other than 4: there it guides an arbitrary subset."""
    value = int(guided) if isinstance(guided, str) and guided.isdigit() else guided
    if value != 3 or int(latent_channels) in (3, 4):
        return None
    return (f"guided_channels=3 guides only the first 3 of this latent space's {latent_channels} channels: "
            "3 is the DiT paper's choice for SD's 4-channel VAE; set guided_channels=all (sample.py, eval_fid.py; "
            "eval.guided_channels=all and log.samples.guided_channels=all in training)")


def warn_partial_guidance(guided, latent_channels: int) -> None:
    """`guided_channels_warning` as a UserWarning (shown once per process, not once per batch)."""
    message = guided_channels_warning(guided, latent_channels)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)


# --------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """Common interface. Subclasses set `latent_channels`, `downsample_factor`, `transform`."""

    name: str
    latent_channels: int
    downsample_factor: int
    transform: LatentTransform
    class_name: str = DEFAULT_CLASS
    deterministic: bool = False  # no posterior noise: encode(sample=True) is encode(sample=False)

    @property
    def scale_factor(self) -> float:
        return self.transform.scale

    def latent_size(self, image_size: int) -> int:
        """Side of the latent grid for square images of side `image_size`."""
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the {self.name} autoencoder's "
                f"downsampling factor {self.downsample_factor}"
            )
        return image_size // self.downsample_factor

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, *untransformed* (the autoencoder's own z): (N, C, h, w) each."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] -> model latents: a posterior sample (the reference's choice for
        training), or its mean with `sample=False`, through the latent transform."""
        mean, std = self.encode_moments(images)
        if sample and not self.deterministic:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return self.transform.apply(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What to store in a checkpoint to rebuild (and check) this autoencoder: the latent
        transform's keys, and "class" where it is not an AutoencoderKL."""
        out = {"name": self.name, "latent_channels": self.latent_channels,
               "downsample_factor": self.downsample_factor, **self.transform.to_dict()}
        if self.class_name != DEFAULT_CLASS:
            out["class"] = self.class_name
        return out


class PixelAutoencoder(Autoencoder):
    """Identity: the model works on the [-1, 1] images themselves."""

    class_name = "pixel"
    deterministic = True

    def __init__(self):
        super().__init__()
        self.name = "pixel"
        self.latent_channels = 3
        self.downsample_factor = 1
        self.transform = LatentTransform(1.0)

    def encode_moments(self, images):
        return images, torch.zeros_like(images)

    def encode(self, images, generator=None, sample=True):
        return images

    def decode(self, latents):
        return latents

    def to_dict(self) -> dict:
        return {"name": self.name, "latent_channels": 3, "downsample_factor": 1, "scale_factor": 1.0}


class VAEAutoencoder(Autoencoder):
    """A diffusers autoencoder of one of the `ENCODINGS` classes; frozen, in eval mode."""

    def __init__(self, vae: nn.Module, name: str, scale_factor: float, transform: LatentTransform | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.class_name = type(vae).__name__
        if self.class_name not in ENCODINGS:
            raise ValueError(f"autoencoder {name!r} is a diffusers {self.class_name}, which this code cannot "
                             f"encode with: use one of {', '.join(ENCODINGS)}")
        self._encoding = ENCODINGS[self.class_name]
        self.deterministic = self._encoding != "latent_dist"
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample_factor = downsample_factor_from_config({**vae.config, "_class_name": self.class_name})
        self.transform = (transform or LatentTransform(float(scale_factor))).check_channels(
            self.latent_channels, f"autoencoder {name!r}")

    @torch.no_grad()
    def encode_moments(self, images):
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        encoded = self.vae.encode(images)
        if self._encoding == "latent_dist":
            return encoded.latent_dist.mean, encoded.latent_dist.std
        latent = getattr(encoded, self._encoding)
        return latent, torch.zeros_like(latent)

    @torch.no_grad()
    def decode(self, latents):
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(self.transform.invert(latents)).sample


def _class_of(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        return DEFAULT_CLASS  # diffusers will say what is missing
    return json.loads(config.read_text(encoding="utf-8")).get("_class_name") or DEFAULT_CLASS


def _diffusers_class(class_name: str, source: str):
    import diffusers

    if class_name not in ENCODINGS:
        raise AutoencoderUnavailable(
            f"autoencoder {source!r} is a diffusers {class_name!r} (config.json `_class_name`), which this code "
            f"cannot encode images with: use one of {', '.join(ENCODINGS)}")
    return getattr(diffusers, class_name)


def _load_vae(source: str, dtype: torch.dtype):
    from diffusers import AutoModel

    if Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        return _diffusers_class(_class_of(directory), source).from_pretrained(str(directory), torch_dtype=dtype)
    # A hub id is "org/name"; anything else that names a place on disk must exist.
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).expanduser().exists():
        raise AutoencoderUnavailable(
            f"autoencoder directory {source!r} does not exist or is not a directory: pass a folder "
            "written by AutoencoderKL.save_pretrained, or a hub id such as stabilityai/sd-vae-ft-ema"
        )
    # A hub id: the local cache first (no network), then a download unless offline mode is on.
    # diffusers' AutoModel picks the class from the model's config.json.
    try:
        return AutoModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
    except Exception as cached_err:  # noqa: BLE001 - diffusers raises several types here
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            raise AutoencoderUnavailable(_unavailable_message(source, cached_err)) from cached_err
    try:
        return AutoModel.from_pretrained(source, torch_dtype=dtype)
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
    *,
    shift_factor: float | None = None,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
    transform: LatentTransform | None = None,
) -> Autoencoder:
    """`"pixel"`, `"sd-ema"`, `"sd-mse"`, a hub id (`org/name`) or a local `save_pretrained` dir.

    Each term of the latent transform defaults to the VAE config's (`scaling_factor`, else
    0.18215; `shift_factor`, else 0; `latents_mean`/`latents_std`, else none), except that
    per-channel `latents_std` given here without `scale_factor` makes the scale 1 (the stats
    standardise the latents already). `transform` (a stored spec's) replaces all four.
    """
    if name == "pixel":
        given = [k for k, v in (("shift_factor", shift_factor), ("latents_mean", latents_mean),
                                ("latents_std", latents_std)) if v is not None]
        if given:
            raise ValueError(f"vae=pixel has no latent transform, but {', '.join(given)} is set: unset it")
        return PixelAutoencoder()
    source = KNOWN_VAES.get(name, name)
    vae = _load_vae(source, dtype)
    if transform is None:
        config = vae.config
        if scale_factor is None:
            scale_factor = 1.0 if latents_std is not None else (getattr(config, "scaling_factor", None) or SD_SCALE_FACTOR)
        if shift_factor is None:
            shift_factor = getattr(config, "shift_factor", None) or 0.0
        if latents_mean is None and latents_std is None:
            latents_mean, latents_std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        transform = LatentTransform(float(scale_factor), float(shift_factor),
                                    tuple(map(float, latents_mean)) if latents_mean is not None else None,
                                    tuple(map(float, latents_std)) if latents_std is not None else None)
    return VAEAutoencoder(vae, name, transform.scale, transform).to(device)


def autoencoder_from_config(vae_cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
    """From a `vae` config section (name, scale_factor, shift_factor, latents_mean, latents_std)."""
    def key(k):
        v = getattr(vae_cfg, k, None)
        return list(v) if v is not None and k.startswith("latents_") else v

    return build_autoencoder(vae_cfg.name, scale_factor=key("scale_factor"), device=device, dtype=dtype,
                             shift_factor=key("shift_factor"), latents_mean=key("latents_mean"),
                             latents_std=key("latents_std"))


def autoencoder_from_spec(spec: Mapping, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
    """Rebuild the autoencoder a checkpoint or a cache recorded (`Autoencoder.to_dict()`), with
    exactly its latent transform, so decoding undoes what encoding did."""
    if spec["name"] == "pixel":
        return PixelAutoencoder()
    transform = LatentTransform.from_spec(spec) if spec.get("scale_factor") is not None else None
    ae = build_autoencoder(spec["name"], device=device, dtype=dtype, transform=transform)
    recorded = spec.get("class", DEFAULT_CLASS)
    if ae.class_name != recorded:
        raise ValueError(f"autoencoder {spec['name']!r} is now a {ae.class_name}, but it was recorded as a {recorded}: "
                         "point vae at the autoencoder the run used")
    return ae
