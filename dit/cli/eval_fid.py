"""`dit-eval` and `python eval_fid.py`: score a sample file, generating it first from a checkpoint
when no file is given; print the metrics, write them as JSON next to the samples, append a row to
the results table and log them to wandb when enabled.

The scoring itself is `dit.scoring.evaluator.Evaluator`, the one training's `eval.every` uses,
made from the same keys (`dit.scoring.config.ScoringConfig`). The docstring of the repository's
eval_fid.py has the commands; this module is what they run.

    record = evaluate_samples(cfg, "samples/run.npz")   # cfg: an EvalConfig
    record = generate_and_evaluate(cfg)                 # cfg.samples, or sample cfg.checkpoint first
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dit.cli.errors import hydra_program
from dit.config import ConfigError, EvalConfig, WandbMode, to_eval_config
from dit.distributed import env_rank
from dit.io.atomic import write_text_atomic
from dit.io.checkpoint import load_state
from dit.io.errors import CheckpointError
from dit.io.images import image_files
from dit.sampling.bulk import check_bulk_output
from dit.sampling.generate import generate_bulk
from dit.sampling.loading import settings_path_for
from dit.scoring.config import ScoringConfig, check_metric_names
from dit.scoring.evaluator import Evaluator
from dit.scoring.extractors import EXTRACTORS
from dit.scoring.images import open_images
from dit.scoring.inception import resolve_inception_weights
from dit.scoring.metrics import reference_usage
from dit.scoring.table import append_results_row, results_row


def evaluate_samples(cfg: EvalConfig | Any, samples: str | os.PathLike) -> dict:
    """Score `samples` against `cfg.reference`; print, write JSON, append to the results table and
    log to wandb when enabled. Returns the record written."""
    cfg = to_eval_config(cfg)
    check_metric_names(cfg.metrics)
    samples = Path(samples).expanduser()
    images, labels = open_images(samples)  # headers only: the images are read batch by batch when scored
    sidecar = settings_path_for(samples) if samples.is_file() else None
    settings = json.loads(sidecar.read_text()) if sidecar is not None and sidecar.is_file() else {}
    if settings.get("mode") == "grid":  # a grid's settings from before grids had their own file (X.png.json)
        settings = {}
    judge_variant = resolve_judge_variant(cfg, settings) if cfg.feature_extractor == "toy_judge" else "colours"
    evaluator = Evaluator(ScoringConfig.from_keys(cfg, judge_variant=judge_variant))
    metrics = evaluator.score(images, labels, progress=True)
    images.close()

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "samples": str(samples),
        "reference": str(cfg.reference),
        "feature_extractor": evaluator.extractor.identity,
        "metrics": metrics,
        "scoring": evaluator.scoring_record(),
        "reference_usage": reference_usage(evaluator.reference, metrics),  # which reference data each metric used
        "sampling": settings,  # what sample.py recorded next to the samples (empty for other sources)
    }
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")

    out_json = Path(cfg.results_json) if cfg.results_json else samples.with_name(
        f"{samples.stem if samples.is_file() else samples.name}.{cfg.feature_extractor}.metrics.json")
    write_text_atomic(out_json, json.dumps(record, indent=2, default=str) + "\n")
    if cfg.results_table:
        append_results_row(cfg.results_table, results_row(record))
    print(f"wrote {out_json}" + (f"; appended a row to {cfg.results_table}" if cfg.results_table else ""))

    if cfg.wandb.mode is not WandbMode.disabled:
        import wandb

        run = wandb.init(mode=cfg.wandb.mode.value, project=cfg.wandb.project, entity=cfg.wandb.entity,
                         job_type="eval", config={"sampling": settings, "reference": str(cfg.reference),
                                                  "feature_extractor": record["feature_extractor"],
                                                  "samples": str(samples)})
        run.log({f"eval/{k}": v for k, v in metrics.items()})
        run.finish()
    return record


def trained_toy_variant(checkpoint: str | os.PathLike | None) -> str | None:
    """The toy variant a training checkpoint was trained on (its config's data.variant, "colours"
    for toy runs from before variants), or None: no such file, not our training checkpoint, or
    not trained on the toy set. Reads the file (weights_only): call it for toy-sized models only."""
    if checkpoint is None or not Path(checkpoint).expanduser().is_file():
        return None
    try:
        state = load_state(Path(checkpoint).expanduser())
    except (OSError, CheckpointError):  # unreadable or not a torch file: nothing to learn from it
        return None
    config = state.get("config") if isinstance(state, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or data.get("kind") != "toy":
        return None
    return str(data.get("variant", "colours"))


def resolve_judge_variant(cfg: EvalConfig, settings: dict | None = None) -> str:
    """eval_fid.py's toy judge variant: `judge_variant` when given; otherwise the toy variant the
    model was trained on (the `checkpoint=` being sampled, else the checkpoint the samples'
    settings file names), so shape-only samples meet the shapes judge without a flag; "colours"
    when neither is a toy-set training checkpoint (samples from elsewhere, release files)."""
    if cfg.judge_variant is not None:
        return cfg.judge_variant
    for checkpoint in (cfg.checkpoint, (settings or {}).get("checkpoint")):
        variant = trained_toy_variant(checkpoint)
        if variant is not None:
            return variant
    return "colours"


def check_samples_path(samples: str | os.PathLike) -> None:
    """ConfigError unless `samples=` is an existing file or folder (what it holds is checked
    when it is opened, from its header)."""
    path = Path(samples).expanduser()
    if not path.exists():
        raise ConfigError(f"samples={samples} does not exist: pass an ADM .npz or a folder of images, or leave "
                          "samples out and give checkpoint=PATH to generate them first")


def check_scoring_inputs(cfg: EvalConfig) -> None:
    """What scoring needs, checked in seconds before generating samples for it (which can take
    hours): known metric names and feature extractor, the Inception weights file (found, or
    downloaded now when allowed), a reference that exists and can be read. ConfigError or
    FeatureExtractorUnavailable naming the key and the fix."""
    check_metric_names(cfg.metrics)
    if cfg.feature_extractor not in EXTRACTORS:
        raise ConfigError(f"feature_extractor={cfg.feature_extractor!r}: use inception or toy_judge")
    if cfg.feature_extractor == "inception":
        resolve_inception_weights(cfg.feature_extractor_weights, allow_download=cfg.allow_download)
    ref = Path(cfg.reference).expanduser()
    fix = "pass an ADM reference batch .npz, a folder of images, or a statistics .npz (dit.scoring.metrics.save_stats)"
    if ref.is_dir():
        if not image_files(ref):
            raise ConfigError(f"reference={cfg.reference} is a folder without images: {fix}")
    elif not ref.is_file():
        raise ConfigError(f"reference={cfg.reference} does not exist: {fix}")
    else:
        try:
            with ref.open("rb"):
                pass
        except OSError as err:
            raise ConfigError(f"reference={cfg.reference} cannot be read ({err.strerror}): fix its permissions") from None
        if not zipfile.is_zipfile(ref):
            raise ConfigError(f"reference={cfg.reference} is not an .npz file (not a zip archive): {fix}")


def check_bulk_out(cfg: EvalConfig) -> None:
    """ConfigError unless `bulk.out` may be written: not the reference, the samples nor the
    checkpoint (also through a symlink or hard link; bulk.out=<the reference> once wrote the
    samples over it and scored them against themselves, FID 0), and not an existing file that
    is not a bulk file of ours (`dit.sampling.bulk.check_bulk_output`). Before any sampling."""
    if not cfg.bulk.out:
        return
    try:
        check_bulk_output(Path(cfg.bulk.out).expanduser(), {"reference": cfg.reference, "samples": cfg.samples,
                                                            "checkpoint": cfg.checkpoint})
    except ValueError as err:
        raise ConfigError(str(err)) from None


def generate_and_evaluate(cfg: EvalConfig | Any) -> dict | None:
    """Score `cfg.samples`, or first generate them from `cfg.checkpoint` with the sampling keys
    (every rank samples, rank 0 scores and returns the record; others None). What scoring needs
    is checked first, in seconds (`check_scoring_inputs`): before generating, and before a
    reference's features are computed for samples that are not there."""
    cfg = to_eval_config(cfg)
    samples = cfg.samples
    if samples is None and cfg.checkpoint is None:
        raise ConfigError("give samples=PATH (an ADM .npz or a folder of images), or checkpoint=PATH to generate "
                          "them first with the sampling settings of conf/sample.yaml")
    if samples is not None:
        check_samples_path(samples)
    check_bulk_out(cfg)
    check_scoring_inputs(cfg)
    if samples is None:
        samples = generate_bulk(cfg)  # the same code path as `python sample.py mode=bulk`
        if env_rank() != 0:
            return None
    return evaluate_samples(cfg, samples)


def eval_fid(cfg: DictConfig) -> None:
    """The work: score `cfg.samples`, or generate them from `cfg.checkpoint` first."""
    generate_and_evaluate(cfg)


# main: the hydra entry; run: the program (one-line errors, dit/cli/errors.py).
main, run = hydra_program("eval", eval_fid)
