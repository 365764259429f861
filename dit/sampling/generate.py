"""What `sample.py` runs, from its config: a PNG grid of chosen classes, or N samples to an ADM
`.npz` split across the ranks (the FID protocol). `eval_fid.py` generates through the same
`generate_bulk` before scoring. Diffusion and flow checkpoints alike: the sampler family follows
what the checkpoint was trained on (`sampler=auto`, the default, picks DDPM or SiT's SDE)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from dit.config import ConfigError, SampleConfig, SampleMode, to_sample_config
from dit.distributed import DistEnv, barrier, broadcast_object, cleanup, init_distributed
from dit.io.atomic import write_json_atomic
from dit.io.checkpoint import CheckpointError
from dit.io.images import save_grid
from dit.sampling.base import Sampler
from dit.sampling.bulk import BulkJob, Ranks, bulk_sample, check_bulk_output
from dit.sampling.guidance import guide_mismatch
from dit.sampling.images import NonFiniteSamplesError, SampleOrder, generate_samples
from dit.sampling.loading import (DEFAULT_SAMPLES_DIR, declared_num_classes, default_output_name, load_for_sampling,
                                  settings_path_for)
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerMismatchError
from dit.sampling.trained import trained_objective


def _load(cfg: SampleConfig, env: DistEnv):
    """(model, autoencoder, provenance, objective): the objective is what the checkpoint was
    trained on: the diffusion chain of its config's `diffusion` node (the linear 1000-step chain
    for DiT's release files), or the flow objective of its `objective` node (SiT's for SiT's
    release file), which the flow samplers integrate."""
    model, autoencoder, provenance = _load_checkpoint(cfg, env, cfg.checkpoint, "checkpoint")
    return model, autoencoder, provenance, trained_objective(provenance, model.config.learn_sigma)


def _load_checkpoint(cfg: SampleConfig, env: DistEnv, checkpoint, key: str):
    """`load_for_sampling` of `checkpoint` with the config's loading keys; a run directory: every
    rank samples rank 0's choice of its newest intact checkpoint, named on rank 0."""
    vae = cfg.vae

    def load(checkpoint):
        return load_for_sampling(
            checkpoint, which=cfg.which, model_name=cfg.model_name, vae=vae.name if vae is not None else None,
            vae_scale_factor=vae.scale_factor if vae is not None else None, device=env.device,
            release_format=cfg.release_format)

    model, autoencoder, provenance = load(checkpoint)
    if Path(checkpoint).expanduser().is_dir():  # a run directory: every rank samples rank 0's choice
        chosen = broadcast_object(provenance["checkpoint"], env)
        if chosen != provenance["checkpoint"]:  # a checkpoint saved meanwhile
            model, autoencoder, provenance = load(chosen)
        if env.is_main:
            print(f"{key}={checkpoint}: sampling {chosen} (step {provenance['step']}), the run's newest "
                  "intact checkpoint", flush=True)
    return model, autoencoder, provenance


# What the settings record says of an autoguidance run's guide (beside the main model's provenance).
GUIDE_RECORD = ("checkpoint", "which", "step", "model_name")


def _load_guide(cfg: SampleConfig, env: DistEnv, loaded: tuple):
    """(guide model, its record) for guidance=autoguidance, else (None, None): `guide_checkpoint`
    loaded as `checkpoint` is, and refused in one line (ConfigError) unless it is a model of the
    same data and objective as the main one (`guide_mismatch`)."""
    if cfg.guidance != "autoguidance":
        return None, None
    model, autoencoder, _, objective = loaded
    try:
        guide, guide_autoencoder, provenance = _load_checkpoint(cfg, env, cfg.guide_checkpoint, "guide_checkpoint")
        guide_objective = trained_objective(provenance, guide.config.learn_sigma)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        raise ConfigError(f"guide_checkpoint={cfg.guide_checkpoint}: {err}") from None
    why = guide_mismatch(model, objective, autoencoder, guide, guide_objective, guide_autoencoder)
    if why:
        raise ConfigError(f"guide_checkpoint={cfg.guide_checkpoint} cannot guide checkpoint={cfg.checkpoint}: {why}; "
                          "autoguidance needs an earlier or smaller model of the same data and objective")
    record = {k: provenance.get(k) for k in GUIDE_RECORD}
    record["model_config"] = guide.config.to_dict()
    return guide, record


def _sampler(cfg: SampleConfig, cfg_scale: float, objective, autoencoder, guide=None) -> Sampler:
    """The sampler for this checkpoint's objective (`sampler=auto`: its default sampler),
    `clip_denoised` resolved for the autoencoder, with the guide model of autoguidance, built once
    for the whole run; a sampler of the other family is refused in one line naming the ones that fit."""
    try:
        return build_sampler(cfg.sampler_settings(cfg_scale), objective, autoencoder, guide=guide)
    except SamplerMismatchError as err:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {err}") from None
    except ValueError as err:  # e.g. a diffusion guidance_interval given to a flow sampler
        raise ConfigError(f"sampler settings: {err}") from None


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
    """The output path (`given`, else outputs/samples/<default name><suffix>, under the working
    directory like training's outputs/, which .gitignore keeps out of a checkout); another suffix is
    refused, before any work: the settings file beside it must not be the output itself."""
    out = Path(given) if given else DEFAULT_SAMPLES_DIR / (default_stem() + suffix)
    if out.suffix != suffix:
        raise ConfigError(f"{key}={given} must end in {suffix} (its settings are written beside it, to "
                          f"{settings_path_for(out.with_suffix(suffix)).name}): use {key}={out.with_suffix(suffix)}")
    return out


# DiT's demo grid (the release's sample.py): its classes, 4 images per row.
DEMO_NROW = 4


def spread_classes(num_classes: int, count: int) -> list[int]:
    """`count` class ids evenly spread over 0..num_classes-1, both ends included (all of them
    when there are no more than `count`)."""
    if num_classes <= count:
        return list(range(num_classes))
    if count == 1:
        return [0]
    return [(2 * i * (num_classes - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]  # rounded


def check_grid_labels(labels, num_classes: int, checkpoint) -> None:
    """ConfigError naming the model's class count and the fix when an explicit `grid.labels`
    has a class the model does not have."""
    if not isinstance(labels, (list, tuple)):
        return
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"grid.labels={list(labels)}: class {bad[0]} is not one of the {num_classes} classes of "
                          f"checkpoint={checkpoint} (ids 0..{num_classes - 1}); leave grid.labels out for a row per "
                          f"class of this model, or list ids below {num_classes}")


def grid_layout(grid, num_classes: int, checkpoint=None) -> dict:
    """What a grid draws for a model with `num_classes` classes: {"labels": one class id per
    image, "nrow": images per row}, with "classes" and "per_class" for `labels=auto` (every class,
    or `grid.max_classes` of them evenly spread, each a row of `grid.per_class` images)."""
    if grid.labels == "auto":
        classes = spread_classes(num_classes, grid.max_classes)
        return {"labels": [y for y in classes for _ in range(grid.per_class)], "nrow": grid.nrow or grid.per_class,
                "classes": classes, "per_class": grid.per_class}
    check_grid_labels(grid.labels, num_classes, checkpoint)
    labels = list(range(num_classes)) if grid.labels == "all" else list(grid.labels)
    return {"labels": labels, "nrow": grid.nrow or DEMO_NROW}


def generate_grid(cfg: SampleConfig | Any) -> Path:
    """mode=grid: the model's classes, a row of `grid.per_class` images each (`grid.labels=auto`),
    or one image per entry of `grid.labels`, written as a PNG with its settings JSON next to it
    (rank 0 draws; other ranks, if any, wait). Returns the PNG path. Explicit labels the model
    does not have are refused before its weights are read, where the file says its class count."""
    cfg = to_sample_config(cfg)
    if cfg.grid.out:
        _output(cfg.grid.out, None, ".png", "grid.out")
    declared = declared_num_classes(cfg.checkpoint)
    if declared is not None:
        check_grid_labels(cfg.grid.labels, declared, cfg.checkpoint)
    env = init_distributed(cfg.device)
    try:
        loaded = _load(cfg, env)
        model, autoencoder, provenance, objective = loaded
        guide, guide_record = _load_guide(cfg, env, loaded)
        if guide_record is not None:
            provenance = {**provenance, "guide": guide_record}
        layout = grid_layout(cfg.grid, model.config.num_classes, cfg.checkpoint)
        labels = layout["labels"]
        sampler = _sampler(cfg, cfg.grid.cfg_scale, objective, autoencoder, guide)
        settings = sampler.settings
        out = _output(cfg.grid.out, lambda: default_output_name(provenance, settings, seed=cfg.seed), ".png", "grid.out")
        if env.is_main:
            stats = {}
            with _naming_the_checkpoint(cfg):
                order = SampleOrder(seed=cfg.seed, batch_size=len(labels), labels=labels)
                images, _ = generate_samples(model, sampler, autoencoder, range(len(labels)), order, progress=True,
                                             stats=stats)
            save_grid(images, out, nrow=layout["nrow"])
            counted = {"nfe": stats["nfe"]} if settings.is_flow else {}  # dopri5's count is only known now
            write_json_atomic(settings_path_for(out), {
                "mode": "grid", **layout, "seed": cfg.seed, **settings.to_dict(), **counted, **provenance,
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
    if cfg.bulk.out:  # before the model loads: the output is not the checkpoint, nor a file not of ours
        check_bulk_output(_output(cfg.bulk.out, None, ".npz", "bulk.out"), {"checkpoint": cfg.checkpoint})
    env = init_distributed(cfg.device)
    try:
        loaded = _load(cfg, env)
        model, autoencoder, provenance, objective = loaded
        guide, guide_record = _load_guide(cfg, env, loaded)
        if guide_record is not None:
            provenance = {**provenance, "guide": guide_record}
        sampler = _sampler(cfg, cfg.bulk.cfg_scale, objective, autoencoder, guide)
        out = _output(cfg.bulk.out, lambda: default_output_name(provenance, sampler.settings, seed=cfg.seed,
                                                                num_samples=cfg.bulk.num_samples), ".npz", "bulk.out")
        start = time.perf_counter()
        with _naming_the_checkpoint(cfg):
            job = BulkJob(num_samples=cfg.bulk.num_samples, seed=cfg.seed, batch_size=cfg.bulk.batch_size,
                          label_mode=cfg.bulk.labels, keep_shards=cfg.bulk.keep_shards)
            bulk_sample(model, sampler, autoencoder, out, job, provenance=provenance, progress=env.is_main,
                        ranks=Ranks(env.rank, env.world_size, lambda: barrier(env)))
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
