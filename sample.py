"""Sample from a DiT checkpoint: a PNG grid, or N images to an ADM `.npz` for FID.

    python sample.py checkpoint=DiT-XL-2-256x256.pt                       # demo grid, cfg 4.0
    torchrun --nproc_per_node=8 sample.py checkpoint=... mode=bulk        # FID-50K protocol
    python sample.py checkpoint=... mode=bulk sampler=dpm++ sampler.num_steps=20 bulk.num_samples=5000

Every option, with its default, is in conf/sample.yaml; the work is done by dit/sampling.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from dit.distributed import barrier, cleanup, init_distributed
from dit.runtime import tune_host_allocator
from dit.sampling import (
    bulk_sample, default_output_name, generate_samples, load_for_sampling, save_grid, settings_path_for,
)


def sampler_options(cfg: DictConfig, cfg_scale: float) -> dict:
    """The keyword arguments every sampling function takes, from the config."""
    interval = cfg.guidance_interval
    if interval is not None:
        interval = [int(v) for v in interval]
        if len(interval) != 2:
            raise ValueError(f"guidance_interval must be [lo, hi], got {interval}")
    return {
        "sampler": cfg.sampler.name,
        "num_steps": int(cfg.sampler.num_steps),
        "eta": float(cfg.sampler.get("eta", 0.0)),
        "cfg_scale": float(cfg_scale),
        "guided_channels": cfg.guided_channels,
        "guidance_interval": interval,
    }


def generate_bulk(cfg: DictConfig) -> Path:
    """mode=bulk: sample `bulk.num_samples` images to an ADM .npz (all ranks take part). Returns
    the output path. Also used by eval_fid.py to generate before scoring."""
    env = init_distributed(cfg.device)
    try:
        model, autoencoder, provenance = load_for_sampling(
            cfg.checkpoint, which=cfg.which, model_name=cfg.model_name, vae=cfg.vae, device=env.device)
        options = sampler_options(cfg, cfg.bulk.cfg_scale)
        out = cfg.bulk.out or Path("samples") / (default_output_name(
            provenance, seed=cfg.seed, num_samples=cfg.bulk.num_samples, **_naming(options)) + ".npz")
        start = time.perf_counter()
        bulk_sample(model, None, autoencoder, out, num_samples=int(cfg.bulk.num_samples), seed=int(cfg.seed),
                    label_mode=cfg.bulk.labels, batch_size=int(cfg.bulk.batch_size), rank=env.rank,
                    world_size=env.world_size, barrier=lambda: barrier(env), provenance=provenance,
                    keep_shards=bool(cfg.bulk.keep_shards), progress=env.is_main, **options)
        if env.is_main:
            print(f"wrote {out} ({cfg.bulk.num_samples} samples, {time.perf_counter() - start:.1f} s on "
                  f"{env.world_size} rank(s)); settings: {settings_path_for(out)}")
        return Path(out)
    finally:
        cleanup(env)


def _naming(options: dict) -> dict:
    return {k: options[k] for k in ("sampler", "num_steps", "cfg_scale", "guided_channels", "guidance_interval")}


def generate_grid(cfg: DictConfig) -> Path:
    """mode=grid: one image per entry of `grid.labels`, written as a PNG (single process)."""
    env = init_distributed(cfg.device)
    try:
        model, autoencoder, provenance = load_for_sampling(
            cfg.checkpoint, which=cfg.which, model_name=cfg.model_name, vae=cfg.vae, device=env.device)
        labels = cfg.grid.labels
        labels = list(range(model.config.num_classes)) if labels == "all" else [int(y) for y in labels]
        options = sampler_options(cfg, cfg.grid.cfg_scale)
        out = Path(cfg.grid.out or Path("samples") / (default_output_name(provenance, seed=cfg.seed, **_naming(options)) + ".png"))
        if env.is_main:  # a grid is small: rank 0 draws it, other ranks (if any) just wait
            images, _ = generate_samples(model, None, autoencoder, range(len(labels)), seed=int(cfg.seed),
                                         labels=labels, batch_size=len(labels), progress=True, **options)
            save_grid(images, out, nrow=int(cfg.grid.nrow))
            settings = {"mode": "grid", "labels": labels, "seed": int(cfg.seed), **options, **provenance,
                        "model_config": model.config.to_dict(), "autoencoder": autoencoder.to_dict()}
            settings_path_for(out).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            print(f"wrote {out}; settings: {settings_path_for(out)}")
        barrier(env)
        return out
    finally:
        cleanup(env)


@hydra.main(config_path="conf", config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.mode == "grid":
        generate_grid(cfg)
    elif cfg.mode == "bulk":
        generate_bulk(cfg)
    else:
        raise ValueError(f"mode must be 'grid' or 'bulk', got {cfg.mode!r}")


if __name__ == "__main__":
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/runtime.py)
    torch.set_grad_enabled(False)
    main()
