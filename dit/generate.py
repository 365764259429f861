"""What `sample.py` runs, from its config: a PNG grid of chosen classes, or N samples to an ADM
`.npz` split across the ranks (the FID protocol). `eval_fid.py` generates through the same
`generate_bulk` before scoring."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from dit.bulk import bulk_sample
from dit.config import ConfigError, SampleConfig, SampleMode, to_sample_config
from dit.distributed import DistEnv, barrier, cleanup, init_distributed
from dit.files import save_grid, write_json_atomic
from dit.sampling import (NonFiniteSamplesError, default_output_name, diffusion_from_config, generate_samples,
                          load_for_sampling, settings_path_for)


def _load(cfg: SampleConfig, env: DistEnv):
    """(model, autoencoder, provenance, diffusion): the diffusion is the chain the checkpoint was
    trained on (its config's `diffusion` node; the linear 1000-step chain for release files)."""
    vae = cfg.vae
    model, autoencoder, provenance = load_for_sampling(
        cfg.checkpoint, which=cfg.which, model_name=cfg.model_name, vae=vae.name if vae is not None else None,
        vae_scale_factor=vae.scale_factor if vae is not None else None, device=env.device)
    return model, autoencoder, provenance, diffusion_from_config(provenance, model.config.learn_sigma)


@contextlib.contextmanager
def _naming_the_checkpoint(cfg: SampleConfig):
    """A NaN/inf sample batch: say which checkpoint (and which weights) produced it."""
    try:
        yield
    except NonFiniteSamplesError as err:
        if str(cfg.checkpoint) in str(err):
            raise
        raise NonFiniteSamplesError(f"checkpoint {cfg.checkpoint} ({cfg.which} weights): {err}") from err


def _output(given: str | None, default_stem, suffix: str, key: str) -> Path:
    """The output path (`given`, else samples/<default name><suffix>); another suffix is refused,
    before any work: the settings file beside it must not be the output itself."""
    out = Path(given) if given else Path("samples") / (default_stem() + suffix)
    if out.suffix != suffix:
        raise ConfigError(f"{key}={given} must end in {suffix} (its settings are written beside it, to "
                          f"{settings_path_for(out.with_suffix(suffix)).name}): use {key}={out.with_suffix(suffix)}")
    return out


def generate_grid(cfg: SampleConfig | Any) -> Path:
    """mode=grid: one image per entry of `grid.labels`, written as a PNG with its settings JSON
    next to it (rank 0 draws; other ranks, if any, wait). Returns the PNG path."""
    cfg = to_sample_config(cfg)
    if cfg.grid.out:
        _output(cfg.grid.out, None, ".png", "grid.out")
    env = init_distributed(cfg.device)
    try:
        model, autoencoder, provenance, diffusion = _load(cfg, env)
        labels = list(range(model.config.num_classes)) if cfg.grid.labels == "all" else list(cfg.grid.labels)
        settings = cfg.sampler_settings(cfg.grid.cfg_scale).resolved(autoencoder)
        out = _output(cfg.grid.out, lambda: default_output_name(provenance, settings, seed=cfg.seed), ".png", "grid.out")
        if env.is_main:
            with _naming_the_checkpoint(cfg):
                images, _ = generate_samples(model, diffusion, autoencoder, range(len(labels)), settings, seed=cfg.seed,
                                             labels=labels, batch_size=len(labels), progress=True)
            save_grid(images, out, nrow=cfg.grid.nrow)
            write_json_atomic(settings_path_for(out), {
                "mode": "grid", "labels": labels, "seed": cfg.seed, **settings.to_dict(), **provenance,
                "model_config": model.config.to_dict(), "autoencoder": autoencoder.to_dict()})
            print(f"wrote {out}; settings: {settings_path_for(out)}")
        barrier(env)
        return out
    finally:
        cleanup(env)


def generate_bulk(cfg: SampleConfig | Any) -> Path:
    """mode=bulk: `bulk.num_samples` images to an ADM `.npz` (every rank samples its share, rank 0
    assembles). Returns the output path."""
    cfg = to_sample_config(cfg)
    if cfg.bulk.out:
        _output(cfg.bulk.out, None, ".npz", "bulk.out")
    env = init_distributed(cfg.device)
    try:
        model, autoencoder, provenance, diffusion = _load(cfg, env)
        settings = cfg.sampler_settings(cfg.bulk.cfg_scale).resolved(autoencoder)
        out = _output(cfg.bulk.out, lambda: default_output_name(provenance, settings, seed=cfg.seed,
                                                                num_samples=cfg.bulk.num_samples), ".npz", "bulk.out")
        start = time.perf_counter()
        with _naming_the_checkpoint(cfg):
            bulk_sample(model, diffusion, autoencoder, out, settings, num_samples=cfg.bulk.num_samples, seed=cfg.seed,
                        label_mode=cfg.bulk.labels, batch_size=cfg.bulk.batch_size, rank=env.rank,
                        world_size=env.world_size, barrier=lambda: barrier(env), provenance=provenance,
                        keep_shards=cfg.bulk.keep_shards, progress=env.is_main)
        if env.is_main:
            print(f"wrote {out} ({cfg.bulk.num_samples} samples, {time.perf_counter() - start:.1f} s on "
                  f"{env.world_size} rank(s)); settings: {settings_path_for(out)}")
        return out
    finally:
        cleanup(env)


def generate(cfg: SampleConfig | Any) -> Path:
    """sample.py: the grid or the bulk file, as `mode` says."""
    cfg = to_sample_config(cfg)
    return generate_grid(cfg) if cfg.mode is SampleMode.grid else generate_bulk(cfg)
