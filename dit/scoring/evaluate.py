"""Evaluation above sampling and metrics: feature extractors by name (Inception or the toy
judge), generate-then-score for eval_fid.py, the in-training evaluator, and the results table.

    record = evaluate_samples(cfg, "samples/run.npz")        # eval_fid.py samples=...
    evaluator = FIDEvaluator(reference, SamplerSettings(), num_samples=5000, cache_dir=...)
    metrics = evaluator.evaluate(ema, diffusion, autoencoder)   # {"fid": ..., ...} on rank 0
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from dit.io.checkpoint import load_state
from dit.config import ConfigError, EvalConfig, WandbMode, to_eval_config
from dit.distributed import env_rank
from dit.io.files import CheckpointError, FileWriteError, atomic_target, image_files, write_text_atomic
from dit.sampling.generate import generate_bulk
from dit.scoring.images import open_images
from dit.scoring.inception import InceptionFeatures, check_feature_precision, resolve_inception_weights
from dit.scoring.judge import JudgeFeatures, ToyJudge
from dit.scoring.metrics import (FeatureExtractor, FeatureStats, check_reference, compute_metrics, load_reference,
                         metrics_from_features, reference_usage, sample_features)
from dit.scoring.precision_recall import check_pr_arithmetic
from dit.sampling import (SETTINGS_FIELDS, SamplerSettings, generate_samples, rank_indices, settings_path_for,
                          unwrap_model)

KNOWN_METRICS = ("fid", "sfid", "isc", "prc", "kid")


def build_feature_extractor(name: str = "inception", *, weights: str | None = None, device: str | None = "auto",
                            batch_size: int = 64, allow_download: bool = True, image_size: int | None = None,
                            judge_cache_dir: str | None = None, judge_seed: int = 0,
                            precision: str = "fp32", judge_variant: str = "colours") -> FeatureExtractor:
    """`"inception"` (FID protocol; `precision` fp32 or tf32) or `"toy_judge"` (quickstart; needs
    `image_size`, trained once per `judge_variant` (dit.data.toy.VARIANTS) and cached in `judge_cache_dir`)."""
    if name == "inception":
        return InceptionFeatures(weights, device=device, batch_size=batch_size, allow_download=allow_download,
                                 precision=precision)
    if name == "toy_judge":
        if image_size is None:
            raise ValueError("feature_extractor=toy_judge needs the image size of the samples")
        return JudgeFeatures(ToyJudge.load_or_train(judge_cache_dir, image_size=image_size, seed=judge_seed,
                                                    variant=judge_variant))
    raise ValueError(f"unknown feature_extractor {name!r}: use 'inception' or 'toy_judge'")


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------

METRIC_COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "kid", "class_accuracy")
# A sampler setting named like a metric (SamplerSettings.precision, the sampling arithmetic, vs the
# precision of precision/recall) gets its column under a prefix: one column per name.
SETTINGS_COLUMNS = {f: f"sampling_{f}" if f in METRIC_COLUMNS else f for f in SETTINGS_FIELDS}
RESULTS_COLUMNS = (
    "time", "checkpoint", "step", *SETTINGS_COLUMNS.values(), "vae", "num_samples", "seed", "labels",
    "feature_extractor", "reference", *METRIC_COLUMNS,
    "num_reference_fid", "num_reference_pr", "feature_precision", "pr_arithmetic", "samples",
)


def append_results_row(path: str | os.PathLike, row: dict) -> Path:
    """Append one evaluation to a CSV table (header written once; columns `RESULTS_COLUMNS`, so
    pandas, or `sort -g` on the FID column, can rank runs). Unknown keys are ignored,
    missing ones left empty. A table written before a column was added (a new sampler setting,
    say) is first rewritten, atomically, with the new header and its rows' new cells empty; a
    table with columns this code does not know is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_header = True
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else None
        if header is not None and tuple(header) != RESULTS_COLUMNS:
            unknown = [c for c in header if c not in RESULTS_COLUMNS]
            if unknown:
                raise ValueError(f"results table {path} has columns {unknown} that this code does not write: "
                                 "move it aside or pass another results_table path")
            _rewrite_table(path, [dict(zip(header, r)) for r in rows[1:]])
        write_header = header is None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, extrasaction="ignore")
    if write_header:
        writer.writeheader()
    writer.writerow({k: _cell(row.get(k)) for k in RESULTS_COLUMNS})
    target = atomic_target(path)  # through a symlink; never into a device or FIFO
    try:
        with open(target, "a", newline="") as f:  # one write: concurrent appends do not interleave lines
            f.write(buf.getvalue())
    except OSError as err:
        raise FileWriteError(path, err, kept="The rows already in it are kept (a cut last line may end it)") from err
    return path


def _rewrite_table(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------
# eval_fid.py: score a sample file (generating it first if needed)
# --------------------------------------------------------------------------------------


def evaluate_samples(cfg: EvalConfig | Any, samples: str | os.PathLike) -> dict:
    """Score `samples` against `cfg.reference`; print, write JSON, append to the results table and
    log to wandb when enabled. Returns the record written."""
    cfg = to_eval_config(cfg)
    check_metric_names(cfg.metrics)
    wanted = set(cfg.metrics)
    samples = Path(samples).expanduser()
    images, labels = open_images(samples)  # headers only: the images are read batch by batch when scored
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    sidecar = settings_path_for(samples) if samples.is_file() else None
    settings = json.loads(sidecar.read_text()) if sidecar is not None and sidecar.is_file() else {}
    if settings.get("mode") == "grid":  # a grid's settings from before grids had their own file (X.png.json)
        settings = {}
    judge_variant = resolve_judge_variant(cfg, settings) if cfg.feature_extractor == "toy_judge" else None
    extractor = build_feature_extractor(
        cfg.feature_extractor, weights=cfg.feature_extractor_weights, device=cfg.device,
        batch_size=cfg.feature_batch_size, allow_download=cfg.allow_download, image_size=images.shape[1],
        judge_cache_dir=str(cache_dir) if cache_dir else None, judge_seed=cfg.judge_seed,
        precision=cfg.feature_precision, judge_variant=judge_variant or "colours")
    reference = load_reference(cfg.reference, extractor, cache_dir=cache_dir / "ref_stats" if cache_dir else None,
                               need_features=bool(wanted & {"prc", "kid"}), progress=True)
    metrics = compute_metrics(
        images, reference, extractor, labels=labels, progress=True, fid="fid" in wanted, sfid="sfid" in wanted,
        isc="isc" in wanted, prc="prc" in wanted, kid="kid" in wanted, prc_k=cfg.prc_k,
        pr_arithmetic=cfg.pr_arithmetic, isc_split_size=cfg.isc_split_size, kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size)
    images.close()

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "samples": str(samples),
        "reference": str(cfg.reference),
        "feature_extractor": extractor.identity,
        "metrics": metrics,
        "scoring": scoring_record(extractor, cfg.pr_arithmetic if "prc" in wanted else None, cfg.prc_k,
                                  judge_variant),
        "reference_usage": reference_usage(reference, metrics),  # which reference data each metric used
        "sampling": settings,  # what sample.py recorded next to the samples (empty for other sources)
    }
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")

    out_json = Path(cfg.results_json) if cfg.results_json else samples.with_name(
        f"{samples.stem if samples.is_file() else samples.name}.{cfg.feature_extractor}.metrics.json")
    write_text_atomic(out_json, json.dumps(record, indent=2, default=str) + "\n")
    row = {**{SETTINGS_COLUMNS.get(k, k): settings.get(k)
              for k in ("checkpoint", "step", *SETTINGS_FIELDS, "vae", "seed", "labels")},
           **metrics, "time": record["time"], "samples": str(samples), "reference": str(cfg.reference),
           "feature_extractor": extractor.identity, "feature_precision": record["scoring"]["feature_precision"],
           "pr_arithmetic": record["scoring"]["pr_arithmetic"]}
    if cfg.results_table:
        append_results_row(cfg.results_table, row)
    print(f"wrote {out_json}" + (f"; appended a row to {cfg.results_table}" if cfg.results_table else ""))

    if cfg.wandb.mode is not WandbMode.disabled:
        import wandb

        run = wandb.init(mode=cfg.wandb.mode.value, project=cfg.wandb.project, entity=cfg.wandb.entity,
                         job_type="eval", config={"sampling": settings, "reference": str(cfg.reference),
                                                  "feature_extractor": extractor.identity, "samples": str(samples)})
        run.log({f"eval/{k}": v for k, v in metrics.items()})
        run.finish()
    return record


def scoring_record(extractor: FeatureExtractor, pr_arithmetic: str | None, prc_k: int,
                   judge_variant: str | None = None) -> dict:
    """How the scores were computed, for the results JSON: the feature precision asked for and
    torch's flags seen during the (last) extraction (None for extractors without the switch),
    precision/recall's arithmetic (None when not computed) and k, and for the toy judge which
    toy variant's judge scored (`judge_variant`; the key is absent for other extractors)."""
    record = {"feature_precision": getattr(extractor, "precision", None),
              "backend_flags_during_extraction": getattr(extractor, "backend_flags", None),
              "pr_arithmetic": pr_arithmetic, "prc_k": prc_k if pr_arithmetic else None}
    if judge_variant is not None:
        record["judge_variant"] = judge_variant
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


def check_metric_names(metrics: Iterable[str]) -> None:
    """ConfigError naming the unknown entries of `metrics=[...]`."""
    unknown = sorted(set(metrics) - set(KNOWN_METRICS))
    if unknown:
        raise ConfigError(f"metrics: unknown {unknown}; choose from {list(KNOWN_METRICS)}")


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
    if cfg.feature_extractor not in ("inception", "toy_judge"):
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


def generate_and_evaluate(cfg: EvalConfig | Any) -> dict | None:
    """eval_fid.py: score `cfg.samples`, or first generate them from `cfg.checkpoint` with the
    sampling keys (every rank samples, rank 0 scores and returns the record; others None). What
    scoring needs is checked first, in seconds (`check_scoring_inputs`): before generating, and
    before a reference's features are computed for samples that are not there."""
    cfg = to_eval_config(cfg)
    samples = cfg.samples
    if samples is None and cfg.checkpoint is None:
        raise ConfigError("give samples=PATH (an ADM .npz or a folder of images), or checkpoint=PATH to generate "
                          "them first with the sampling settings of conf/sample.yaml")
    if samples is not None:
        check_samples_path(samples)
    check_scoring_inputs(cfg)
    if samples is None:
        samples = generate_bulk(cfg)  # the same code path as `python sample.py mode=bulk`
        if env_rank() != 0:
            return None
    return evaluate_samples(cfg, samples)


# --------------------------------------------------------------------------------------
# In-training evaluation
# --------------------------------------------------------------------------------------


class FIDEvaluator:
    """Periodic evaluation during training: sample `num_samples` images with the (EMA) model as
    `settings` say and score them against a reference whose statistics are computed once (on
    the first call, and cached on disk in `cache_dir`). Sample i depends only on (seed, i), so
    the same step gives the same numbers whatever the number of ranks.

    Under torch.distributed every rank must call `evaluate` (each samples its share); the result
    is returned on rank 0 and None elsewhere.
    """

    def __init__(self, reference: str | os.PathLike, settings: SamplerSettings, *,
                 feature_extractor: str | FeatureExtractor = "inception", feature_extractor_weights: str | None = None,
                 allow_download: bool = True, num_samples: int = 5000, label_mode: str = "uniform", seed: int = 0,
                 batch_size: int = 32, cache_dir: str | os.PathLike | None = None, judge_cache_dir: str | None = None,
                 metrics: Iterable[str] = ("fid", "isc", "prc"), device: str | None = "auto",
                 feature_precision: str = "fp32", pr_arithmetic: str = "fp32", feature_batch_size: int = 64,
                 judge_seed: int = 0, prc_k: int = 3, judge_variant: str = "colours"):
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for a covariance, got {num_samples}")
        self.reference_source = reference
        self.settings = settings.check()
        self.feature_extractor = feature_extractor
        self.feature_extractor_weights = feature_extractor_weights
        self.allow_download = allow_download
        self.num_samples = int(num_samples)
        self.label_mode, self.seed, self.batch_size = label_mode, int(seed), int(batch_size)
        self.cache_dir, self.judge_cache_dir = cache_dir, judge_cache_dir
        self.metrics = set(metrics)
        check_metric_names(self.metrics)
        self.device = device
        self.feature_batch_size, self.judge_seed, self.prc_k = int(feature_batch_size), int(judge_seed), int(prc_k)
        self.judge_variant = judge_variant  # toy_judge: which toy variant's judge scores
        # checked now, not after the first round of sampling
        self.feature_precision = check_feature_precision(feature_precision)
        self.pr_arithmetic = check_pr_arithmetic(pr_arithmetic)
        self._extractor: FeatureExtractor | None = None
        self._reference: FeatureStats | None = None

    def prepare(self, image_size: int, reference: bool = True) -> None:
        """Build the extractor and (`reference`: the rank that scores) load the reference
        statistics, checked against `image_size`: what `evaluate` needs, so that calling this at
        start-up finds a missing file or weight before any sampling."""
        if self._extractor is None:
            if isinstance(self.feature_extractor, str):
                self._extractor = build_feature_extractor(
                    self.feature_extractor, weights=self.feature_extractor_weights, device=self.device,
                    batch_size=self.feature_batch_size, allow_download=self.allow_download, image_size=image_size,
                    judge_cache_dir=self.judge_cache_dir, judge_seed=self.judge_seed,
                    precision=self.feature_precision, judge_variant=self.judge_variant)
            else:
                self._extractor = self.feature_extractor
        if not reference:
            return
        if self._reference is None:
            self._reference = load_reference(self.reference_source, self._extractor, cache_dir=self.cache_dir,
                                             need_features="prc" in self.metrics or "kid" in self.metrics)
        check_reference(self._reference, (image_size, image_size))  # before sampling

    @torch.no_grad()
    def evaluate(self, model, diffusion, autoencoder, *, rank: int = 0, world_size: int = 1,
                 progress: bool = False) -> dict[str, float] | None:
        model = unwrap_model(model)
        image_size = model.config.input_size * autoencoder.downsample_factor
        self.prepare(image_size, reference=rank == 0)
        indices = rank_indices(self.num_samples, self.batch_size, rank, world_size)
        images, labels = generate_samples(model, diffusion, autoencoder, indices, self.settings, seed=self.seed,
                                          label_mode=self.label_mode, batch_size=self.batch_size, progress=progress)
        feats = sample_features(images, self._extractor, labels) if len(indices) else None  # more ranks than blocks
        if world_size > 1:
            # Gather per-image features (not images) and put them back in sample order.
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, (indices, feats))
            if rank != 0:
                return None
            gathered = [g for g in gathered if g[1] is not None]
            order = np.argsort(np.concatenate([g[0] for g in gathered]), kind="stable")
            feats = {k: np.concatenate([g[1][k] for g in gathered])[order] for k in gathered[0][1]}
        return metrics_from_features(
            feats, self._reference, self._extractor.identity, fid="fid" in self.metrics,
            sfid="sfid" in self.metrics, isc="isc" in self.metrics, prc="prc" in self.metrics,
            kid="kid" in self.metrics, prc_k=self.prc_k, pr_arithmetic=self.pr_arithmetic,
            image_size=(image_size, image_size))
