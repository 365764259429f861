"""Evaluation during training (`eval.every`, docs/training.md "Evaluation during training").

Every `eval.every` steps, and at `max_steps`, the EMA weights sample `eval.num_samples` images
with the `eval.*` sampler settings, each rank its share of the sample indices (sample i from
(eval.seed, i) alone, so the numbers do not depend on the number of ranks); rank 0 scores them
with `dit.scoring.evaluator.Evaluator`, made from the same keys as eval_fid.py's (`ScoringConfig.from_keys`),
so it computes what `eval_fid.py` computes.
The scores go to metrics.jsonl (`eval/<metric>` keys, a line of their own) and wandb. With
`eval.keep_best`, the checkpoint of the best score so far is kept as `checkpoints/best.pt`
(a hard link or a copy, written atomically; keep_last prunes only `<step>.pt` files) and
described in `checkpoints/best.json`.

Flow runs (objective=flow) are evaluated the same way with a flow sampler: eval.sampler=auto
(the default) is SiT's SDE for them and DDPM for diffusion runs; the trainer's objective (a
FlowMatching) is what `run` samples, so its path and network time are the run's.

With eval.feature_extractor=toy_judge, `eval.judge_variant` picks which toy variant's judge
scores (dit.data.toy.VARIANTS); left at null it is the run's own: data.variant for a toy-set run
(data=toy_shapes is scored by the shapes judge), "colours" for any other data.

Everything the evaluator needs (reference, extractor weights, the toy judge) is loaded when
the trainer is built, so a bad `eval.*` key stops the run at start-up, not at the first
evaluation. Sampling runs under `torch.random.fork_rng`: a run trains bitwise the same with
evaluation on or off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from dit.autoencoder import autoencoder_from_spec
from dit.config.checks import check_toy_variant
from dit.config.run_keys import EVAL_SCHEDULE_KEYS
from dit.config.schema import ConfigError, TrainEvalConfig
from dit.distributed import DistEnv, broadcast_object
from dit.flow.config import objective_kind
from dit.io.atomic import write_atomic, write_json_atomic
from dit.sampling.order import LABEL_MODES
from dit.sampling.settings import FLOW_FIELDS, SamplerMismatchError, SamplerSettings
from dit.scoring.config import ScoringConfig, check_metric_names
from dit.scoring.evaluator import Evaluator, SamplePlan

log = logging.getLogger(__name__)

BEST_CHECKPOINT, BEST_RECORD = "best.pt", "best.json"  # in the run's checkpoints/ directory
# Which way is better, by the result key; `eval.metrics` entry that produces each key.
LOWER_IS_BETTER = {"fid": "fid", "sfid": "sfid", "kid": "kid"}
HIGHER_IS_BETTER = {"inception_score": "isc", "precision": "prc", "recall": "prc", "class_accuracy": None}


def eval_settings(cfg: TrainEvalConfig, objective: str = "diffusion") -> SamplerSettings:
    """The SamplerSettings part of the `eval` node (its grid-like extra keys left out), for a run
    of `objective` ("diffusion" | "flow"): eval.sampler=auto (the default) becomes that
    objective's default sampler (DDPM, or SiT's SDE for flow); the other family raises
    SamplerMismatchError (a ValueError)."""
    settings = SamplerSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplerSettings)})
    return settings.for_objective(objective)


def protocol(cfg: TrainEvalConfig, objective: str = "diffusion") -> dict:
    """Everything that decides an evaluation's numbers: scores under another protocol are not
    compared with each other (best.json records it)."""
    # The flow-only knobs come back from to_dict for flow samplers only (a diffusion protocol is unchanged).
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in EVAL_SCHEDULE_KEYS and f.name not in FLOW_FIELDS and f.name != "judge_variant"}
    # The judge variant only where it is not the colour judge: best.json files written before
    # variants existed keep matching the protocol of the same settings.
    if cfg.feature_extractor == "toy_judge" and cfg.judge_variant not in (None, "colours"):
        out["judge_variant"] = cfg.judge_variant
    out.update(eval_settings(cfg, objective).to_dict(), metrics=sorted(cfg.metrics))
    return json.loads(json.dumps(out, default=str))


def check_eval_config(cfg: TrainEvalConfig, parallel: str, world_size: int, objective: str = "diffusion") -> None:
    """What can be checked without loading anything; ConfigError naming the `eval.` key.
    `objective`: the run's objective kind, which the sampler must fit."""
    if cfg.every < 0:
        raise ConfigError(f"eval.every must be >= 0 (0: no evaluation during training), got {cfg.every}")
    if cfg.reference is None:
        raise ConfigError(f"eval.every={cfg.every} needs eval.reference=PATH (an ADM reference batch, a folder of "
                          "real images or cached statistics, as eval_fid.py's reference), or eval.every=0")
    if not Path(cfg.reference).expanduser().exists():
        raise ConfigError(f"eval.reference={cfg.reference} does not exist: give an existing reference file or folder")
    if cfg.feature_extractor not in ("inception", "toy_judge"):
        raise ConfigError(f"eval.feature_extractor must be inception or toy_judge, got {cfg.feature_extractor!r}")
    if cfg.judge_variant is not None:
        check_toy_variant(cfg.judge_variant, "eval.judge_variant")
    weights = cfg.feature_extractor_weights
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"eval.feature_extractor_weights={weights} does not exist: give torch-fidelity's Inception "
                          "file, or null to use the hub cache")
    check_metric_names(cfg.metrics, "eval.metrics", at_least_one=True)
    if cfg.num_samples < 2 or cfg.batch_size < 1:
        raise ConfigError(f"eval.num_samples must be >= 2 and eval.batch_size >= 1, got {cfg.num_samples} and "
                          f"{cfg.batch_size}")
    if cfg.labels not in LABEL_MODES:
        raise ConfigError(f"eval.labels must be one of {LABEL_MODES}, got {cfg.labels!r}")
    try:
        eval_settings(cfg, objective).check()
    except SamplerMismatchError as err:
        raise ConfigError(f"eval.sampler: {err}") from None
    except ValueError as err:
        raise ConfigError(f"eval sampler settings: {err}") from None
    if cfg.keep_best:
        source = {**LOWER_IS_BETTER, **HIGHER_IS_BETTER}
        if cfg.best_metric not in source:
            raise ConfigError(f"eval.best_metric must be one of {sorted(source)}, got {cfg.best_metric!r}")
        needed = source[cfg.best_metric]
        if needed is not None and needed not in cfg.metrics:
            raise ConfigError(f"eval.best_metric={cfg.best_metric} needs {needed!r} in eval.metrics")
        if needed is None and cfg.feature_extractor != "toy_judge":
            raise ConfigError("eval.best_metric=class_accuracy needs a classifier: eval.feature_extractor=toy_judge")
    if parallel == "fsdp" and world_size > 1:
        # The sharded EMA needs every rank in each forward pass, and the ranks' shares differ.
        raise ConfigError("eval.every is not supported under parallel=fsdp with several ranks: use parallel=ddp, "
                          "or score the checkpoints with eval_fid.py")


class TrainingEvaluator:
    """The `eval` node of a run, held by the trainer: `due(step)`, `run(...)` on every rank,
    `saved(step, path)` after a checkpoint. Built with `build_training_evaluator`."""

    def __init__(self, cfg: TrainEvalConfig, env: DistEnv, ckpt_dir: Path, max_steps: int, autoencoder,
                 input_size: int, objective: str = "diffusion"):
        self.cfg, self.env, self.ckpt_dir, self.max_steps = cfg, env, Path(ckpt_dir), max_steps
        self.autoencoder = autoencoder  # decodes the samples
        # eval_fid.py's keys, so its cache layout too: the same reference statistics and judge files.
        self.evaluator = Evaluator(ScoringConfig.from_keys(cfg, device=str(env.device),
                                                           judge_variant=cfg.judge_variant or "colours"))
        self.samples = SamplePlan(eval_settings(cfg, objective), num_samples=cfg.num_samples, label_mode=cfg.labels,
                                  seed=cfg.seed, batch_size=cfg.batch_size)
        self._prepare(input_size * autoencoder.downsample_factor)
        self.protocol = protocol(cfg, objective)
        self.best = self._read_best() if env.is_main else None
        self.pending: Optional[tuple[int, dict]] = None  # a new best waiting for its checkpoint

    def _prepare(self, image_size: int) -> None:
        """Rank 0 first (it may train the judge or compute reference statistics into the cache),
        then the others load the cached files; a failure stops every rank with rank 0's message."""
        error = None
        if self.env.is_main:
            try:
                self.evaluator.prepare((image_size, image_size))
            except (OSError, ValueError, RuntimeError) as err:
                error = f"{type(err).__name__}: {err}"
        error = broadcast_object(error, self.env)
        if error is not None:
            raise ConfigError(f"eval: the evaluator cannot start ({error}); fix eval.reference / "
                              "eval.feature_extractor_weights (or eval.allow_download=true), or set eval.every=0")
        if not self.env.is_main:
            self.evaluator.prepare((image_size, image_size), reference=False)

    def _read_best(self) -> Optional[dict]:
        path = self.ckpt_dir / BEST_RECORD
        if not path.is_file():
            return None
        try:
            best = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is unreadable: the best checkpoint is chosen afresh", path)
            return None
        if best.get("protocol") != self.protocol or best.get("metric") != self.cfg.best_metric:
            log.warning("%s was scored with other eval settings: the next evaluation's checkpoint replaces it", path)
            return None
        return best

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == self.max_steps)

    def run(self, step: int, ema_module: torch.nn.Module, objective, logger) -> bool:
        """Evaluate the EMA weights at `step` (every rank calls this), log the scores from rank 0.
        Returns, on every rank, whether this step is a new best whose checkpoint must be written."""
        start = time.perf_counter()
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's random streams stay untouched
            scores = self.evaluator.evaluate(ema_module, objective, self.autoencoder, self.samples,
                                             rank=self.env.rank, world_size=self.env.world_size)
        new_best = False
        if self.env.is_main:
            values = {f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
            values["eval/seconds"] = time.perf_counter() - start
            _log_line(logger, step, values)
            new_best = self.cfg.keep_best and self._is_better(scores)
            if new_best:
                self.pending = (step, scores)
        return bool(broadcast_object(new_best, self.env))

    def _is_better(self, scores: dict) -> bool:
        key = self.cfg.best_metric
        value = scores.get(key)
        if not isinstance(value, (int, float)):
            log.warning("eval.best_metric=%s was not computed (%s): no best checkpoint kept", key, sorted(scores))
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if key in LOWER_IS_BETTER else value > self.best["value"]

    def saved(self, step: int, checkpoint: Path) -> None:
        """After the checkpoint of `step` is written: a pending best of that step becomes
        best.pt (rank 0)."""
        if not self.env.is_main or self.pending is None or self.pending[0] != step:
            return
        _, scores = self.pending
        self.pending = None
        _link_or_copy_atomic(Path(checkpoint), self.ckpt_dir / BEST_CHECKPOINT)
        self.best = {"step": step, "metric": self.cfg.best_metric, "value": scores[self.cfg.best_metric],
                     "checkpoint": BEST_CHECKPOINT, "copied_from": Path(checkpoint).name, "scores": scores,
                     "protocol": self.protocol}
        write_json_atomic(self.ckpt_dir / BEST_RECORD, self.best)
        log.info("step %d: new best %s %.6g: kept as %s", step, self.cfg.best_metric, self.best["value"],
                 self.ckpt_dir / BEST_CHECKPOINT)


def _log_line(logger, step: int, values: dict) -> None:
    """The scores as a metrics.jsonl line of their own (the step's train line has its keys) and
    to wandb, at the same step."""
    with open(logger.metrics_file, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
    log.info("step %d  %s", step, "  ".join(f"{k} {v:.6g}" for k, v in values.items()))
    if logger.wandb is not None:
        logger.wandb.log(values, step=step)


def _link_or_copy_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content, atomically: a hard link (no copy of a large file; a
    checkpoint is never rewritten in place, so the two stay equal), else a copy."""
    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src, tmp)

    write_atomic(dst, write)


def run_judge_variant(cfg) -> str:
    """The toy judge variant of a run's evaluation: eval.judge_variant when set, else the run's
    own toy variant (data.variant) when it trains on the toy set, else "colours"."""
    if cfg.eval.judge_variant is not None:
        return cfg.eval.judge_variant
    data = cfg.data
    return getattr(data, "variant", "colours") if getattr(data, "kind", None) == "toy" else "colours"


def build_training_evaluator(cfg, env: DistEnv, ckpt_dir: Path, parallel: str, latents,
                             input_size: int) -> Optional[TrainingEvaluator]:
    """The run's evaluator (None when eval.every is 0), checked and loaded now: at start-up.
    `latents` is the trainer's LatentSpace (its decoder; built here from the cache's record when
    a latents cache left it out), `input_size` the model's latent side."""
    if not cfg.eval.every:
        return None
    objective = objective_kind(getattr(cfg, "objective", None))  # diffusion | flow | meanflow
    check_eval_config(cfg.eval, parallel, env.world_size, objective)
    eval_cfg = dataclasses.replace(cfg.eval, judge_variant=run_judge_variant(cfg))  # resolved: protocol and judge
    autoencoder = latents.autoencoder or autoencoder_from_spec(latents.spec, device=env.device)
    return TrainingEvaluator(eval_cfg, env, ckpt_dir, cfg.max_steps, autoencoder, input_size, objective)
