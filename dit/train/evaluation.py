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

Sized and said: eval.num_samples=null (the default) is sized for the run (`sized_num_samples`:
5000 where the run's steps between two passes allow it, fewer for short runs), and at start-up
(`announce`) the trainer logs what a pass samples (images, sampler, network evaluations) and
how long its sampling takes, from a timed network batch; each pass logs its start, a tqdm bar over
its samples (rank 0, stderr) and, after its first batch, the time it will take.

Preemption: `run` reads the trainer's preemption flag before every network evaluation (one
process) or between sampling batches (several ranks, which agree on it in one collective) and
abandons the pass with EvaluationInterrupted, writing no scores: the trainer then writes the
checkpoint of the step, records in it that the step's evaluation is missing (`eval_pending`), and
exits with fault.preempt_exit_code; the relaunch does that evaluation before its first step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dit.autoencoder import autoencoder_from_spec
from dit.config.checks import check_toy_variant
from dit.config.run_keys import EVAL_SCHEDULE_KEYS
from dit.config.schema import ConfigError, TrainEvalConfig
from dit.distributed import DistEnv, all_reduce_sum, broadcast_object
from dit.flow.config import objective_kind
from dit.io.atomic import write_atomic, write_json_atomic
from dit.sampling.order import LABEL_MODES, rank_indices
from dit.sampling.precision import forward_precision
from dit.sampling.settings import FLOW_FIELDS, GUIDANCE_METHOD_FIELDS, SamplerMismatchError, SamplerSettings
from dit.scoring.config import ScoringConfig, check_metric_names
from dit.scoring.evaluator import Evaluator, SamplePlan
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

BEST_CHECKPOINT, BEST_RECORD = "best.pt", "best.json"  # in the run's checkpoints/ directory
# Which way is better, by the result key; `eval.metrics` entry that produces each key.
LOWER_IS_BETTER = {"fid": "fid", "sfid": "sfid", "kid": "kid"}
HIGHER_IS_BETTER = {"inception_score": "isc", "precision": "prc", "recall": "prc", "class_accuracy": None}


# eval.num_samples=null: the largest of these whose pass costs at most EVAL_SHARE of the training
# between two passes (in network passes over one image: a training image costs TRAIN_PASSES, the
# forward and the backward), else the smallest. A fixed ladder, so that runs sized alike compare.
SIZED_NUM_SAMPLES = (5000, 2000, 1000, 500)
EVAL_SHARE = 0.5
TRAIN_PASSES = 3


class EvaluationInterrupted(Exception):
    """A preemption signal stopped the evaluation of `step` during its sampling; no score was
    written. Raised on every rank alike."""

    def __init__(self, step: int):
        super().__init__(f"the evaluation of step {step} was interrupted by a preemption signal")
        self.step = step


def passes_per_image(settings: SamplerSettings) -> tuple[int, bool]:
    """(network evaluations per sample, whether guidance doubles each of them) of resolved
    sampler `settings`. dopri5's adaptive count is taken as num_steps (an assumption)."""
    nfe = settings.nfe if settings.is_flow else None
    return int(nfe if nfe is not None else settings.num_steps), float(settings.cfg_scale) != 1.0


def pass_cost(settings: SamplerSettings, num_samples: int) -> int:
    """A pass's sampling in network passes over one image (a guided pass counts twice)."""
    nfe, guided = passes_per_image(settings)
    return num_samples * nfe * (2 if guided else 1)


def train_cost(every: int, max_steps: int, global_batch_size: int) -> int:
    """The training between two passes, in the same unit: forward and backward of each image."""
    return max(1, min(every, max_steps)) * global_batch_size * TRAIN_PASSES


def sized_num_samples(settings: SamplerSettings, every: int, max_steps: int, global_batch_size: int) -> int:
    """eval.num_samples=null: the largest of SIZED_NUM_SAMPLES whose pass costs at most EVAL_SHARE
    of the training between two passes, else the smallest. From the config alone (never from a
    timing), so that every rank and every relaunch of the run samples the same images."""
    budget = EVAL_SHARE * train_cost(every, max_steps, global_batch_size)
    return next((n for n in SIZED_NUM_SAMPLES if pass_cost(settings, n) <= budget), SIZED_NUM_SAMPLES[-1])


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
    # The flow-only knobs come back from to_dict for flow samplers only (a diffusion protocol is unchanged),
    # and the guidance method and APG's knobs only when not cfg (a protocol from before them is unchanged).
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in EVAL_SCHEDULE_KEYS and f.name not in FLOW_FIELDS and f.name not in GUIDANCE_METHOD_FIELDS
           and f.name != "judge_variant"}
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
    if cfg.guidance == "autoguidance":
        raise ConfigError("eval.guidance=autoguidance needs a guide model, which evaluation during training does not "
                          "load: use eval.guidance=cfg or apg, and score checkpoints with autoguidance with "
                          "eval_fid.py checkpoint=... guidance=autoguidance guide_checkpoint=...")
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
    if cfg.num_samples is not None and cfg.num_samples < 2 or cfg.batch_size < 1:
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
    """The `eval` node of a run, held by the trainer: `announce(model, ...)` at start-up,
    `due(step)`, `run(...)` on every rank, `saved(step, path)` after a checkpoint, `logged(step)`
    on resume. Built with `build_training_evaluator` (`cfg.num_samples` resolved)."""

    def __init__(self, cfg: TrainEvalConfig, env: DistEnv, ckpt_dir: Path, max_steps: int, autoencoder,
                 input_size: int, objective: str = "diffusion"):
        self.cfg, self.env, self.ckpt_dir, self.max_steps = cfg, env, Path(ckpt_dir), max_steps
        self.autoencoder = autoencoder  # decodes the samples
        # eval_fid.py's keys, so its cache layout too: the same reference statistics and judge files.
        self.evaluator = Evaluator(ScoringConfig.from_keys(cfg, device=str(env.device),
                                                           judge_variant=cfg.judge_variant or "colours"))
        self.samples = SamplePlan(eval_settings(cfg, objective), num_samples=cfg.num_samples, label_mode=cfg.labels,
                                  seed=cfg.seed, batch_size=cfg.batch_size)
        num_blocks = -(-cfg.num_samples // cfg.batch_size)
        self.my_samples = len(rank_indices(cfg.num_samples, cfg.batch_size, env.rank, env.world_size))
        self.my_batches = len(range(env.rank, num_blocks, env.world_size))
        # Batches that every rank samples: the preemption check after each is one collective, which
        # all ranks must reach (a rank with one more batch finishes it unchecked).
        self.checked_batches = num_blocks // env.world_size
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

    def describe(self) -> str:
        """What one pass samples: "48 images (ddim, 5 steps, guidance 2: 5 network evaluations
        per image on a doubled batch) in 4 batches of 12"."""
        settings, n = self.samples.settings, self.samples.num_samples
        nfe, guided = passes_per_image(settings)
        count = "adaptive (taken as num_steps)" if settings.sampler == "dopri5" else str(nfe)
        guidance = f", guidance {settings.cfg_scale:g}" if guided else ", no guidance"
        doubled = " on a doubled batch" if guided else ""
        ranks = f" per rank (on {self.env.world_size} ranks)" if self.env.world_size > 1 else ""
        return (f"{n} images ({settings.sampler}, {settings.num_steps} steps{guidance}: {count} network evaluations "
                f"per image{doubled}) in {self.my_batches} batches of {self.samples.batch_size}{ranks}")

    def announce(self, model: torch.nn.Module, global_batch_size: int, exit_code: int) -> None:
        """At start-up, on rank 0: log what one pass samples, how long its sampling takes (from one
        timed network batch of the eval batch size, now) and its share of the compute between two
        passes; warn when the pass costs more than the training between them."""
        if not self.env.is_main:
            return
        settings, cfg = self.samples.settings, self.cfg
        nfe, _ = passes_per_image(settings)
        seconds = self._time_network_batch(model) * nfe * self.my_batches
        ratio = pass_cost(settings, self.samples.num_samples) / train_cost(cfg.every, self.max_steps,
                                                                            global_batch_size)
        between = min(cfg.every, self.max_steps)
        log.info("eval.every=%d: each pass samples %s and scores them with %s: about %s of sampling per pass "
                 "(estimated from one network batch timed at start-up; decoding and scoring add to it), %s times "
                 "the compute of the %d training steps between two passes; a preemption signal stops a pass "
                 "(exit %d, the pass redone on relaunch)", cfg.every, self.describe(), cfg.feature_extractor,
                 _duration(seconds), _times(ratio), between, exit_code)
        if ratio > 1:
            log.warning("eval: one pass costs %s times the training between two passes (eval.every=%d): raise "
                        "eval.every, or lower eval.num_samples or eval.num_steps", _times(ratio), cfg.every)

    def _time_network_batch(self, model: torch.nn.Module) -> float:
        """Seconds of one forward pass of `model` over an eval batch (doubled when guided), timed
        on the second of two passes (the first pays for allocation and kernel choice); NaN when it
        cannot be timed (the estimate is then unknown, the run unaffected). Zeros in, under
        fork_rng and no_grad: the training's state and random streams stay untouched."""
        settings, c = self.samples.settings, model.config
        _, guided = passes_per_image(settings)
        n = min(self.samples.batch_size, self.samples.num_samples) * (2 if guided else 1)
        device = next(model.parameters()).device
        x = torch.zeros(n, c.in_channels, c.input_size, c.input_size, device=device)
        time_inputs = int(getattr(c, "time_inputs", 1) or 1)  # MeanFlow's DiT takes [t, r]
        t = torch.full((n,) if time_inputs == 1 else (n, time_inputs), 0.5, device=device)
        y = torch.zeros(n, dtype=torch.long, device=device)
        devices = [device] if device.type == "cuda" else []
        seconds = float("nan")
        try:
            with (torch.random.fork_rng(devices=devices), torch.no_grad(),
                  forward_precision(settings.precision, device)):
                for _ in range(2):
                    start = time.perf_counter()
                    model(x, t, y)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - start
        except (RuntimeError, ValueError, TypeError) as err:
            log.warning("eval: could not time a network batch for the start-up estimate (%s)", err)
            return float("nan")
        return seconds

    def logged(self, step: int, logger) -> bool:
        """Whether metrics.jsonl holds scores of `step` (rank 0 reads; every rank gets the answer)."""
        found = False
        if self.env.is_main:
            try:
                with open(logger.metrics_file) as f:
                    for raw in f:
                        try:
                            line = json.loads(raw)
                        except ValueError:
                            continue
                        if line.get("step") == step and any(str(k).startswith("eval/") for k in line):
                            found = True
            except FileNotFoundError:
                pass
        return bool(broadcast_object(found, self.env))

    def run(self, step: int, ema_module: torch.nn.Module, objective, logger,
            preempted: Optional[Callable[[], bool]] = None) -> bool:
        """Evaluate the EMA weights at `step` (every rank calls this), log the scores from rank 0.
        Returns, on every rank, whether this step is a new best whose checkpoint must be written.
        `preempted()` (this rank has received a preemption signal) is asked after each sampling
        batch, the answers of all ranks combined (on one process also before each network
        evaluation): when one is yes, EvaluationInterrupted is raised on every rank and nothing is
        logged."""
        start = time.perf_counter()
        if self.env.is_main:
            log.info("eval at step %d: sampling %s", step, self.describe())
        bar = tqdm(total=self.my_samples, desc=f"eval at step {step}", unit="img", leave=False,
                   disable=not self.env.is_main, dynamic_ncols=True)
        done = 0

        def after_batch(indices, images, labels) -> None:
            nonlocal done
            done += 1
            bar.update(len(indices))
            if done == 1 and self.env.is_main and self.my_batches > 1:
                took = time.perf_counter() - start
                log.info("eval at step %d: first batch sampled in %s: about %s to sample this pass's %d batches",
                         step, _duration(took), _duration(took * self.my_batches), self.my_batches)
            if preempted is not None and done <= self.checked_batches and self._stop(preempted):
                raise EvaluationInterrupted(step)

        def before_forward(module, args) -> None:
            if preempted():
                raise EvaluationInterrupted(step)

        # One process: the flag is also read before every network evaluation, so that a signal is
        # honoured within one forward pass, whatever the batch size. Several ranks must stop together,
        # which they agree on between batches (a lone rank stopping mid-batch would leave the others
        # waiting at the next collective).
        hook = None
        if preempted is not None and not self.env.distributed:
            hook = getattr(ema_module, "x_embedder", ema_module).register_forward_pre_hook(before_forward)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # training's random streams stay untouched
                scores = self.evaluator.evaluate(ema_module, objective, self.autoencoder, self.samples,
                                                 rank=self.env.rank, world_size=self.env.world_size,
                                                 on_batch=after_batch)
        finally:
            bar.close()
            if hook is not None:
                hook.remove()
        new_best = False
        if self.env.is_main:
            values = {f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
            values["eval/seconds"] = time.perf_counter() - start
            _log_line(logger, step, values)
            new_best = self.cfg.keep_best and self._is_better(scores)
            if new_best:
                self.pending = (step, scores)
        return bool(broadcast_object(new_best, self.env))

    def _stop(self, preempted: Callable[[], bool]) -> bool:
        """Whether any rank has received a preemption signal (one all-reduce under several ranks)."""
        flag = bool(preempted())
        if not self.env.distributed:
            return flag
        return all_reduce_sum(torch.tensor(float(flag), device=self.env.device), self.env).item() > 0

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


def _times(ratio: float) -> str:
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "an unknown time"
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
    # resolved: the judge variant and the number of samples (protocol and sampling)
    eval_cfg = dataclasses.replace(cfg.eval, judge_variant=run_judge_variant(cfg),
                                   num_samples=resolve_num_samples(cfg, objective))
    autoencoder = latents.autoencoder or autoencoder_from_spec(latents.spec, device=env.device)
    return TrainingEvaluator(eval_cfg, env, ckpt_dir, cfg.max_steps, autoencoder, input_size, objective)


def resolve_num_samples(cfg, objective: str) -> int:
    """eval.num_samples as set, or (null) `sized_num_samples` for the run, logged on rank 0."""
    if cfg.eval.num_samples is not None:
        return int(cfg.eval.num_samples)
    settings = eval_settings(cfg.eval, objective)
    n = sized_num_samples(settings, cfg.eval.every, cfg.max_steps, cfg.global_batch_size)
    log.info("eval.num_samples=null: %d samples, the largest of %s whose pass costs at most %g of the training "
             "between two passes (%d steps of %d images, %d network passes each); set eval.num_samples to choose",
             n, list(SIZED_NUM_SAMPLES), EVAL_SHARE, min(cfg.eval.every, cfg.max_steps), cfg.global_batch_size,
             TRAIN_PASSES)
    return n
