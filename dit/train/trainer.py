"""The trainer: builds a run from its config (data, latent space, model, EMA, optimizer,
diffusion, data stream, reporting, fault handling) and runs the loop. `train.py` resolves the
hydra config and calls `run_training`. Where each part lives: docs/design.md."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dit.config import ConfigError, TrainConfig, check_static, resolve_architecture
from dit.diffusion import create_diffusion
from dit.data import LatentCacheMismatch
from dit.distributed import (
    DistEnv, all_reduce_sum, broadcast_object, cleanup, full_optimizer_state, init_distributed,
    load_full_optimizer_state, shard_model, wrap_model,
)
from dit.flow.config import flow_from_config, is_flow, time_inputs
from dit.models import DiT, arch_name, describe, option_values
from dit.models.repa import RepaHead, RepaTerm, load_encoder
from dit.train.ema import EMA
from dit.train.evaluation import EvaluationInterrupted, build_training_evaluator
from dit.train.faults import (
    NonFiniteGuard, NonFiniteTrainingError, PreemptionWatch, TrainingPreempted, make_faults, preemption_signals,
)
from dit.train.init_from import apply_init_from, read_init_from
from dit.train.lock import run_directory_lock
from dit.train.optimizer import apply_hyperparameters, build_optimizer, learning_rate, set_learning_rate
from dit.train.randomness import RandomnessSpec, seed_rank, step_randomness
from dit.train.report import GridSampler, MetricsWindow, RunLogger
from dit.train.resume import (
    CHECKPOINT_FORMAT_VERSION, CheckpointPolicy, check_checkpoint_fits, check_same_data, latest_checkpoint,
    load_start_state, plain_config, save_checkpoint,
)
from dit.train.step import LossScaler, StepInputs, StepSetup, take_over_label_dropout, train_step
from dit.train.stream import DataStream, build_data, build_latent_space

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # by `precision`


def configure_backends(cfg: TrainConfig) -> None:
    precision = "tf32" if cfg.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_model(cfg: TrainConfig, input_size: int, in_channels: int, num_classes: int) -> DiT:
    arch = resolve_architecture(cfg.model)
    return DiT(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        mlp_ratio=cfg.model.mlp_ratio, class_dropout_prob=cfg.model.class_dropout_prob,
        learn_sigma=cfg.model.learn_sigma, **arch, **option_values(cfg.model),
        time_inputs=time_inputs(cfg.objective),  # 2 for MeanFlow: [t, r]
    )


def build_objective(cfg: TrainConfig):
    """What the step trains and the grids sample: DiT's GaussianDiffusion (objective=diffusion),
    or a dit.flow.FlowMatching built from the `objective` keys (objective=flow), or a
    dit.flow.MeanFlow from them and the `meanflow` keys (objective=meanflow)."""
    if is_flow(cfg.objective):
        record = plain_config(cfg)
        return flow_from_config(record["objective"], record["meanflow"])
    return create_diffusion(
        "", noise_schedule=cfg.diffusion.noise_schedule, learn_sigma=cfg.model.learn_sigma,
        diffusion_steps=cfg.diffusion.diffusion_steps,
    )


def build_repa(cfg: TrainConfig, model: DiT, data, device: torch.device) -> Optional[RepaTerm]:
    """REPA's term (dit/models/repa.py) when `repa.encoder` is set, its head hooked on block `repa.depth`
    of `model` (before any compile or DDP wrapper): features from the cache when the data is a
    latents cache (which must hold the encoder's features), else from the encoder on the fly.
    The head's optimizer is added by the trainer. None when REPA is off."""
    r = cfg.repa
    if r.encoder is None:
        return None
    encoder = None
    if data.encoded:  # a latents cache: it must hold this encoder's features of the same views
        try:
            dim = int(data.dataset.use_repa_features(r.encoder, r.resolution)["dim"])
        except LatentCacheMismatch as err:
            raise ConfigError(str(err)) from None
    else:
        encoder = load_encoder(r.encoder, r.resolution, weights=r.encoder_weights, device=device,
                               trust_hub_repo=r.trust_hub_repo)
        dim = encoder.dim
    # Its own seed: the same initial projector whether an encoder was built (and drew random
    # weights before loading its own) or the features come from a cache.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)  # built on the CPU: CUDA's generators untouched
        head = RepaHead(model.config.hidden_size, dim, r.projector_dim).to(device)
    try:
        head.attach(model, r.depth)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    log.info("REPA: projector %d -> %d -> %d on block %d of %d, coeff %g, features %s", model.config.hidden_size,
             r.projector_dim, dim, r.depth, len(model.blocks), r.coeff,
             "from the latents cache" if encoder is None else f"of {r.encoder} at {r.resolution} px on the fly")
    return RepaTerm(head, r.coeff, encoder)


def official_name(model: DiT) -> Optional[str]:
    """`DiT-XL/2` etc. when the model is one of the paper's, else None (also when it has
    architecture options: rmsnorm, swiglu, ... is not the paper's model of that size)."""
    c = model.config
    if c.mlp_ratio != 4.0 or c.options():
        return None
    return arch_name(c.depth, c.hidden_size, c.num_heads, c.patch_size)


def run_training(cfg: TrainConfig, out_dir: str | os.PathLike, on_start: Optional[Callable[[], None]] = None) -> dict:
    """Train as configured, writing checkpoints, metrics and samples under `out_dir` (rank 0's
    value is used on every rank). Returns {"step", "loss", "checkpoint", "skipped_steps"} of the
    end of the run.

    Faults (docs/reliability.md): raises TrainingPreempted (a SystemExit with status
    fault.preempt_exit_code) after the checkpoint a preemption signal asked for,
    NonFiniteTrainingError after fault.max_nonfinite_steps consecutive non-finite steps, and
    CheckpointWriteError when a checkpoint cannot be written (the previous one is kept), and
    RunDirectoryBusy when another run holds the run directory (nothing there is touched).
    A preemption signal during start-up raises TrainingPreempted at once, writing nothing.

    `on_start` is called on rank 0 once every start-up check has passed (the lock is held, the
    config fits the run directory's checkpoint, data and weights are loaded), before the first
    step: train.py writes hydra's `.hydra/` files there, so a refused launch changes none of them."""
    # The preemption signals are watched from the very start: a signal during start-up exits
    # with fault.preempt_exit_code at once (nothing to save yet), not with the signal's default.
    with PreemptionWatch(preemption_signals(cfg.fault.preempt_signals), cfg.fault.preempt_exit_code) as watch:
        env = init_distributed(cfg.device, timeout_minutes=cfg.fault.dist_timeout_minutes)
        try:
            check_static(cfg, env.world_size)  # before any data is read, weights loaded or file written
            with run_directory_lock(Path(out_dir), env):  # before anything in the run directory is read or changed
                trainer = Trainer(cfg, Path(out_dir), env)
                if on_start is not None and env.is_main:
                    on_start()
                return trainer.run(watch)
        finally:
            cleanup(env)


class Trainer:
    """Everything one rank holds during a run; built from the config, then `run()`."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, env: DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out_dir = Path(broadcast_object(str(out_dir.resolve()), env))  # one run directory for all ranks
        self.ckpt_dir = self.out_dir / "checkpoints"
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        configure_backends(cfg)
        self.config_dict = plain_config(cfg)
        state = load_start_state(cfg, self.ckpt_dir, self.config_dict, env)
        self.init_weights = read_init_from(cfg, env, state)  # fine-tuning: only when starting fresh
        self.preempt_signals = preemption_signals(cfg.fault.preempt_signals)
        self.faults = make_faults(cfg.debug, env.rank)

        self.data = build_data(cfg, identify=env.is_main)  # rank 0 fingerprints the data, for all
        self.data.identity = broadcast_object(self.data.identity, env)
        if state is not None:
            check_same_data(state, self.data.identity, cfg)
        self.latents = build_latent_space(cfg, self.data, resolve_architecture(cfg.model)["patch_size"], self.device)
        self._build_model(state)
        self._build_optimizer(state)
        self.step = int(state["step"]) if state is not None else 0
        self.start_checkpoint = Path(state["source"]) if state is not None else None
        seed_rank(cfg.seed, self.step, env.rank, env.world_size, self.device,
                  (state or {}).get("rng", {}).get("ranks", []))
        # GaussianDiffusion or FlowMatching: the step calls either's training_losses alike.
        self.objective = build_objective(cfg)
        self.flow = is_flow(cfg.objective)
        self.stream = DataStream(self.data.dataset, env, cfg.global_batch_size, cfg.seed, cfg.data.num_workers,
                                 worker_ignored_signals=self.preempt_signals)
        # Steps with a non-finite loss or gradient: in total, and in the current unbroken run.
        self.guard = NonFiniteGuard(cfg.fault.max_nonfinite_steps, env, bool(self.preempt_signals),
                                    (state or {}).get("nonfinite_steps"))
        self._build_step()
        if state is not None:
            size = (state.get("data_state") or {}).get("dataset_size")
            if size not in (None, len(self.data.dataset)):
                log.warning("the data set has %d items, the checkpoint's had %s: the data order differs from "
                            "the interrupted run's", len(self.data.dataset), size)
        self.logger = RunLogger(env, self.out_dir, cfg.log.wandb, cfg.name, self.config_dict,
                                state.get("wandb_run_id") if state is not None else None, self.step, cfg.max_steps)
        self.grid = (GridSampler(cfg.log.samples, cfg.seed, env, self.parallel, self.latents.shape,
                                 self.data.num_classes, self.out_dir) if cfg.log.samples.every else None)
        # eval.every: checked and loaded now, so a bad eval.* key fails at start-up (None when off)
        self.evaluation = build_training_evaluator(cfg, env, self.ckpt_dir, self.parallel, self.latents,
                                                   self.model.config.input_size)
        # The evaluation of the step of a checkpoint written by a preemption that stopped (or skipped)
        # it: redone before the first step (this run directory's own checkpoints only).
        self.eval_pending: Optional[int] = None
        self.redo_eval = (state.get("eval_pending") if state is not None and state.get("own") else None)
        if self.evaluation is not None:
            self.evaluation.announce(self.ema.module, cfg.global_batch_size, cfg.fault.preempt_exit_code)

    # ---- construction

    def _build_model(self, state: Optional[dict]) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
        model = build_model(cfg, self.latents.side, self.latents.channels, self.data.num_classes).to(self.device)
        if self.init_weights is not None:  # into the model, so into the EMA made from it below
            apply_init_from(self.init_weights, model)
            self.init_weights = None  # the file's tensors are not needed any more
        self.drop_prob = take_over_label_dropout(model)
        self.ema = EMA(model, cfg.ema.decay)
        if state is not None:
            check_checkpoint_fits(state, model.config.to_dict(), cfg)
            model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
        self.model_name = official_name(model)
        # REPA's head hooks the plain model, so before compile and the DDP wrapper (contract 8:
        # its projector is not part of the model, so neither of its state dict nor of the EMA)
        self.repa = build_repa(cfg, model, self.data, self.device)
        if self.repa is not None and state is not None:
            if "repa" not in state:
                raise ConfigError("repa.encoder is set but the checkpoint holds no REPA projector: resume with "
                                  "the run's own repa settings, or start a new run directory")
            self.repa.head.load_state_dict(state["repa"]["head"])
        log.info(
            "model %s: %s, %.2fM parameters, input %s, %d classes; %d rank(s), %s, global batch %d",
            self.model_name or "custom", model.config.to_dict(), sum(p.numel() for p in model.parameters()) / 1e6,
            self.latents.shape, self.data.num_classes, env.world_size, self.device, cfg.global_batch_size,
        )
        log.info("model: %s; objective: %s", describe(model), cfg.objective.kind)
        model.gradient_checkpointing = cfg.grad_checkpointing
        self.parallel = cfg.parallel.value if env.distributed else "none"
        if cfg.compile:
            if self.parallel == "fsdp":
                for block in model.blocks:  # per block, before sharding (FSDP2's recommended order)
                    block.compile()
            else:
                model.compile()  # in place: the state-dict keys stay the official ones
        self.model = model  # owns the parameters and the official state-dict keys
        self.train_module = wrap_model(model, env, self.parallel)  # what the step calls (DDP, FSDP or model)
        if self.parallel == "fsdp":
            shard_model(self.ema.module, env)  # sharded like the model, so EMA updates are shard-local

    def _build_optimizer(self, state: Optional[dict]) -> None:
        self.opt = build_optimizer(self.model.parameters(), self.cfg.optim, self.device, self.parallel)
        if state is not None:
            load_full_optimizer_state(self.model, self.opt, state["opt"])
            apply_hyperparameters(self.opt, self.cfg.optim)  # the config's hyperparameters, not the file's
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.repa is not None:  # its own AdamW, like the model's (the model's state is keyed by its names)
            self.repa.opt = build_optimizer(self.repa.head.parameters(), self.cfg.optim, self.device, "none")
            if state is not None:
                load_full_optimizer_state(self.repa.head, self.repa.opt, state["repa"]["opt"])
                apply_hyperparameters(self.repa.opt, self.cfg.optim)
            self.params += self.repa.parameters()  # clipped and checked with the model's
            self.repa_sum = torch.zeros((), device=self.device)  # the window's REPA loss, for loss/repa
        self.scaler = None  # fp16's loss scaling; its state is in checkpoints as `scaler`
        if self.cfg.precision.value == "fp16":
            o = self.cfg.optim
            self.scaler = LossScaler(self.device.type, o.loss_scale_init, o.loss_scale_growth_interval)
            if state is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])

    def _build_step(self) -> None:
        """The fixed parts of every step: what it draws (`self.randomness`), what it trains and
        how (`self.step_setup`)."""
        cfg, lat = self.cfg, self.latents
        self.randomness = RandomnessSpec(
            cfg.seed, cfg.global_batch_size, lat.shape, None if self.flow else self.objective.num_timesteps,
            self.drop_prob, posterior=lat.sample_posterior, sample_t=self.objective.sample_t if self.flow else None,
        )
        self.step_setup = StepSetup(
            self.train_module, self.objective, self.opt, self.ema, num_classes=self.data.num_classes,
            params=self.params, grad_clip=cfg.optim.grad_clip, autocast_dtype=AUTOCAST_DTYPES[cfg.precision.value],
            accum_steps=cfg.optim.grad_accum_steps, update_if=self.guard.update_if, hooks=self.faults,
            encode=lat.to_latents, scaler=self.scaler, repa=self.repa,
            # MeanFlow's adaptive weight keeps train/loss near 1 whatever the error: its unweighted
            # error is logged beside it as loss/mse (docs/meanflow.md).
            watch=("mse",) if cfg.objective.kind == "meanflow" else (),
        )
        self.term_sums = {name: torch.zeros((), device=self.device) for name in self.step_setup.watch}

    # ---- the parts of the loop

    def train_one(self, x: torch.Tensor, y: torch.Tensor, step: int,
                  features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step` (= self.step + 1) on this rank's rows of its global batch: (loss, grad norm).
        `features`: the batch's cached REPA features (a latents cache built with repa_encoder=)."""
        cfg, env = self.cfg, self.env
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        r = step_randomness(self.randomness, self.step, env.rank, env.world_size, self.device)
        lr = learning_rate(step, cfg.optim, cfg.max_steps)  # from the step: no state
        set_learning_rate(self.opt, lr)
        if self.repa is not None:
            set_learning_rate(self.repa.opt, lr)
        loss, grad_norm = train_step(self.step_setup, StepInputs(x, y, r, step=step, features=features))
        if self.repa is not None:
            self.repa_sum += self.repa.last_loss
        for name, value in self.step_setup.last_terms.items():
            self.term_sums[name] += value
        if self.scaler is not None and self.scaler.skipped:
            log.info("step %d: fp16 gradient overflow: update skipped, loss scale lowered to %g (the gradient "
                     "scaler's design, not a failure; %d such steps so far)",
                     step, self.scaler.scale, self.scaler.skipped_steps)
        return loss, grad_norm

    def log_window(self, window: MetricsWindow, step: int, last_ckpt: Optional[Path], last_save: float) -> tuple:
        """Write the window's metric line; (mean loss, whether a time-based checkpoint is due)."""
        cfg = self.cfg
        # Rank 0's clock decides time-based saves, so that all ranks agree.
        overdue = (self.env.is_main and cfg.ckpt.every_minutes is not None
                   and time.monotonic() - last_save > 60 * cfg.ckpt.every_minutes)
        loss, grad_norm, overdue, elapsed = window.reduce(self.env, overdue)
        extra = {}
        if self.repa is not None:  # the mean over ranks and the window's steps (skipped ones too)
            extra["loss/repa"] = all_reduce_sum(self.repa_sum.clone(), self.env).item() / self.env.world_size / window.steps
            self.repa_sum.zero_()
        for name, total in self.term_sums.items():  # the same mean, of the objective's watched terms
            extra[f"loss/{name}"] = all_reduce_sum(total.clone(), self.env).item() / self.env.world_size / window.steps
            total.zero_()
        # No per-step guard caught it (a window of only fp16 scaler skips has no mean: not a failure).
        if cfg.fault.max_nonfinite_steps is None and not math.isfinite(loss) and window.good:
            raise NonFiniteTrainingError(
                f"the training loss is {loss} at step {step}; the newest checkpoint is {last_ckpt}. "
                "Lower optim.lr, set optim.grad_clip, or use precision=fp32"
            )
        self.logger.metrics(step, {
            "train/loss": loss, "train/grad_norm": grad_norm, "train/lr": self.opt.param_groups[0]["lr"],
            "train/steps_per_sec": window.steps / elapsed,
            "train/images_per_sec": window.steps * cfg.global_batch_size / elapsed,
            "train/epoch": step / self.stream.steps_per_epoch, "train/skipped_steps": self.guard.counts["total"],
            **({} if self.scaler is None else {"train/loss_scale": self.scaler.scale,
                                               "train/scaler_skipped_steps": self.scaler.skipped_steps}),
            **extra,
        })
        window.reset()
        return loss, overdue

    def save_checkpoint(self, previous: Optional[Path] = None) -> Path:
        meta = dict(
            model_name=self.model_name, model_config=self.model.config.to_dict(), autoencoder=self.latents.spec,
            config=self.config_dict, data_state=self.stream.position(self.step), wandb_run_id=self.logger.run_id,
            format_version=CHECKPOINT_FORMAT_VERSION, nonfinite_steps=dict(self.guard.counts),
            data_identity=self.data.identity,
            **({} if self.scaler is None else {"scaler": self.scaler.state_dict()}),
            # this step's evaluation was interrupted (or skipped) by a preemption: the relaunch redoes it
            **({} if self.eval_pending != self.step else {"eval_pending": self.step}),
            # contract 8: the projector (training-only) beside the model, never in its state dict
            **({} if self.repa is None else {"repa": {"head": {k: v.cpu() for k, v in self.repa.head.state_dict().items()},
                                                      "opt": full_optimizer_state(self.repa.head, self.repa.opt)}}),
        )
        policy = CheckpointPolicy(self.ckpt_dir, self.cfg.ckpt.keep_last, self.cfg.ckpt.keep_every, self.faults)
        return save_checkpoint(self.env, policy, self.step, self.model, self.ema.module, self.opt, meta, previous)

    def sample_grid(self, step: int) -> None:
        path = self.grid.sample(self.ema.module, self.objective, self.latents.autoencoder, step)
        if path is not None:
            self.logger.image(step, "samples", path)

    # ---- the loop

    def run(self, watch: PreemptionWatch) -> dict:
        """The loop, under `watch` (installed by `run_training` before start-up)."""
        batches = self.stream.batches(self.step)
        watch.started()
        try:
            return self._loop(watch, batches)
        finally:
            # Stop the DataLoader workers now: left to the interpreter's exit, they would be
            # sent SIGTERM, which they ignore (see DataStream), and waited for forever.
            batches.close()
            self.logger.close()

    def evaluate(self, step: int, watch: PreemptionWatch) -> bool:
        """The evaluation of `step` (every rank): whether it is a new best. A preemption signal
        during its sampling raises EvaluationInterrupted on every rank (TrainingEvaluator.run)."""
        return self.evaluation.run(step, self.ema.module, self.objective, self.logger,
                                   preempted=lambda: watch.received is not None)

    def redo_evaluation(self, watch: PreemptionWatch, checkpoint: Optional[Path]) -> None:
        """Before the first step: the evaluation of the resumed step, when a preemption stopped it
        and metrics.jsonl holds no scores of it. Preempted again, exit with nothing new written
        (the checkpoint on disk still asks for the evaluation)."""
        step = self.step
        if (self.redo_eval != step or self.evaluation is None or not self.evaluation.due(step)
                or self.evaluation.logged(step, self.logger)):
            return
        log.info("step %d: its evaluation was interrupted by a preemption: evaluating it now, before step %d",
                 step, step + 1)
        try:
            if self.evaluate(step, watch):
                self.evaluation.saved(step, checkpoint)  # this step's checkpoint is the one resumed from
        except EvaluationInterrupted:
            code = self.cfg.fault.preempt_exit_code
            log.warning("preempted (%s) during the evaluation of step %d: its checkpoint %s is on disk and the "
                        "relaunch evaluates it again; exiting with status %d so that the launcher requeues the job",
                        watch.signal_name or "a signal on another rank", step, checkpoint, code)
            watch.hand_over()
            raise TrainingPreempted(code) from None

    def _loop(self, watch: PreemptionWatch, batches) -> dict:
        cfg = self.cfg
        self.guard.received = lambda: watch.received is not None
        self.guard.weights = self.params
        self.train_module.train()
        window, last_loss = MetricsWindow(self.device), float("nan")
        last_ckpt, last_save = latest_checkpoint(self.ckpt_dir), time.monotonic()
        self.redo_evaluation(watch, self.start_checkpoint)
        while self.step < cfg.max_steps:
            step = self.step + 1
            x, y, *features = next(batches)  # a latents cache with REPA features: (latents, labels, features)
            loss, grad_norm = self.train_one(x, y, step, *features)
            self.step = step
            self.logger.step()
            # A scaler's overflow skip is neither averaged (its gradient norm is inf) nor a failure.
            window.add(loss, grad_norm, self.guard.updated and not (self.scaler is not None and self.scaler.skipped))
            self.guard.record(step, loss, grad_norm, last_ckpt)  # raises after too many non-finite steps
            save_now = step % cfg.ckpt.every == 0 or step == cfg.max_steps
            if step % cfg.log.every == 0 or step == cfg.max_steps:
                last_loss, overdue = self.log_window(window, step, last_ckpt, last_save)
                save_now = save_now or overdue
            if self.grid is not None and step % cfg.log.samples.every == 0:
                self.sample_grid(step)
            if self.evaluation is not None and self.evaluation.due(step):
                # before the checkpoint: a kill during the evaluation redoes it on resume; a new best
                # (eval.keep_best) forces this step's checkpoint, which becomes checkpoints/best.pt.
                # A preemption signal before or during it: the checkpoint is written now, marked
                # as missing this evaluation, which the relaunch does first.
                if self.guard.preempt:
                    self.eval_pending = step  # no time to sample
                else:
                    try:
                        save_now = self.evaluate(step, watch) or save_now
                    except EvaluationInterrupted:
                        self.guard.preempt, self.eval_pending = True, step
            if save_now or self.guard.preempt or self.faults.forces_checkpoint(step):
                last_ckpt, last_save = self.save_checkpoint(last_ckpt), time.monotonic()
                if self.evaluation is not None:
                    self.evaluation.saved(step, last_ckpt)
            if self.guard.preempt:
                code = cfg.fault.preempt_exit_code
                log.warning("preempted (%s): wrote checkpoint %s at step %d%s; exiting with status %d so that the "
                            "launcher requeues the job; relaunching the same command resumes from it",
                            watch.signal_name or "a signal on another rank", last_ckpt, step,
                            "" if self.eval_pending != step else
                            " (its evaluation was stopped: the relaunch does it first)", code)
                watch.hand_over()  # the launcher's own handler (submitit: requeue), if any
                raise TrainingPreempted(code)
            self.faults.after_step(step)
        final = latest_checkpoint(self.ckpt_dir) if self.env.is_main else None
        return {"step": self.step, "loss": last_loss, "checkpoint": None if final is None else str(final),
                "skipped_steps": self.guard.counts["total"]}
