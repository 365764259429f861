"""Build a latents cache: `python -m dit.cache_latents data_root=IMAGEFOLDER out_dir=DIR [vae=sd-ema]`
(installed: `dit-cache-latents ...`, dit/cli/cache_latents.py).

Thin hydra entry point around `dit.data.build_latent_cache` (dit/data/cache.py). Under torchrun
each rank encodes its own shards (process group: NCCL on GPU, gloo on CPU); rank 0 writes
meta.json at the end. A data_root that is not an ImageFolder (or any other known failure)
ends in one line, the data path checked before the autoencoder is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dit.autoencoder import build_autoencoder
from dit.cli import config_dir
from dit.cli.errors import reports_errors, run_program
from dit.config import ConfigError, VAEConfig
from dit.data import CacheFormat, CacheRun, build_latent_cache, check_image_root
from dit.models.repa import check_encoder_source, load_encoder


@dataclass
class CacheLatentsConfig:
    data_root: str = MISSING  # ImageFolder root: one subfolder per class
    out_dir: str = MISSING  # where shards and meta.json go; rerun with the same value to resume
    # The autoencoder, chosen as for train.py: vae=sd-ema|sd-mse|pixel, or vae=local vae.name=DIR.
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_size: int = 256  # ADM center crop size
    flip: bool = True  # also encode each image's mirror (keeps flip augmentation exact)
    # Storage dtypes (float16 | bfloat16 | float32): the posterior mean in float32 keeps it exactly
    # (float16 rounds it by more than the SD VAEs' posterior std: docs/training.md); the std only
    # scales the noise and float16 halves its bytes. mean_dtype=float16 is the format of caches
    # built before this option (32 KiB per 256px image with flips, against 48 KiB).
    dtype: str = "float16"  # the posterior std's
    mean_dtype: str = "float32"  # the posterior mean's
    shard_size: int = 4096  # images per shard file
    batch_size: int = 32  # images per encoder call (x2 with flip)
    num_workers: Optional[int] = None  # DataLoader workers decoding images; null: min(4, usable CPUs)
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when available, else cpu
    vae_dtype: str = "float32"  # encoder compute dtype (float32 | bfloat16 | float16)
    skip_bad: bool = False  # skip (and list in meta.json) unreadable images instead of failing
    progress: bool = True
    # REPA (dit/models/repa.py, docs/repa.md): also store this frozen encoder's patch features of every
    # view (timm id, torch.hub owner/repo:entry, or a timm save_for_hf directory); null: none.
    repa_encoder: Optional[str] = None
    repa_encoder_weights: Optional[str] = None  # a local weights file for a timm id
    # a torch.hub id runs its repository's hubconf.py: known repositories only, and only with this set
    repa_trust_hub_repo: bool = False
    repa_resolution: int = 224  # encoder input side (as train.py's repa.resolution)
    repa_dtype: str = "float16"  # storage dtype of the features (float32: exactly the encoder's)


ConfigStore.instance().store(name="cache_latents_schema", node=CacheLatentsConfig)


def cache_latents(cfg: CacheLatentsConfig) -> None:
    # Everything that can be checked cheaply, before the autoencoder (which can take minutes to load)
    check_image_root(cfg.data_root)
    try:
        vae_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.vae_dtype]
    except KeyError:
        raise ConfigError(f"vae_dtype={cfg.vae_dtype!r}: use float32, bfloat16 or float16") from None
    if cfg.repa_encoder is not None:
        check_encoder_source(cfg.repa_encoder, cfg.repa_trust_hub_repo, key="repa_trust_hub_repo")
        if cfg.repa_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"repa_dtype={cfg.repa_dtype!r}: use float16, bfloat16 or float32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world_size > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        autoencoder = build_autoencoder(cfg.vae.name, scale_factor=cfg.vae.scale_factor, device=device, dtype=vae_dtype,
                                        shift_factor=cfg.vae.shift_factor, latents_mean=cfg.vae.latents_mean,
                                        latents_std=cfg.vae.latents_std)
        repa_encoder = None
        if cfg.repa_encoder is not None:
            repa_encoder = load_encoder(cfg.repa_encoder, cfg.repa_resolution, weights=cfg.repa_encoder_weights,
                                        device=device, trust_hub_repo=cfg.repa_trust_hub_repo,
                                        trust_key="repa_trust_hub_repo")
        fmt = CacheFormat(flip=cfg.flip, dtype=cfg.dtype, mean_dtype=cfg.mean_dtype, shard_size=cfg.shard_size,
                          repa_dtype=cfg.repa_dtype)
        run = CacheRun(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, progress=cfg.progress,
                       skip_bad=cfg.skip_bad)
        out = build_latent_cache(cfg.data_root, autoencoder, cfg.out_dir, cfg.image_size, fmt, run, repa_encoder)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"latents cache ready: {out}")


@hydra.main(version_base=None, config_path=config_dir(), config_name="cache_latents")
@reports_errors()  # a known failure ends in one line (dit/cli/errors.py)
def main(cfg) -> None:
    cache_latents(OmegaConf.to_object(cfg))


def run() -> None:
    """The program: what `python -m dit.cache_latents ...` and `dit-cache-latents ...` do."""
    run_program(main)  # known failures in one line (dit/cli/errors.py)


if __name__ == "__main__":
    run()
