"""One optimizer step of DiT, as a plain function: what the trainer and the benchmarks call.

    spec = RandomnessSpec(seed, B, latent_shape, diffusion.num_timesteps, drop_prob)
    setup = StepSetup(model, diffusion, opt, ema, num_classes=K, params=params)   # once per run
    r = step_randomness(spec, step, rank, world, device)                           # every step
    loss, grad_norm = train_step(setup, StepInputs(x0, y, r, step=step))

    # a flow objective (dit/flow): continuous times from the same per-step generator
    spec = RandomnessSpec(seed, B, latent_shape, None, drop_prob, sample_t=flow.sample_t)
    setup = StepSetup(model, flow, opt, ema, num_classes=K, params=params)

No run config and no I/O: the caller hands in, once, the model (or its DDP/FSDP wrapper), the
objective (a GaussianDiffusion or a FlowMatching: both have `training_losses(model, x0, t,
model_kwargs, noise)`), the optimizer, the EMA and how the step runs (`StepSetup`), and per step
a batch of latents and the step's randomness (`StepInputs`). Fault injection for the crash tests
comes in as one hooks object (`dit/train/faults.py`), a no-op by default.

Gradient accumulation (`accum_steps=K`) runs this rank's rows as K equal micro-batches of
consecutive rows, slicing the step's randomness with them: the timesteps, noise and dropout
mask of each sample are the ones of the whole batch, so K micro-batches give the update of one
batch (up to float rounding). fp16 training passes a `LossScaler`.

REPA (dit/models/repa.py) comes in as a `RepaTerm`: per micro-batch the encoder's features of the items
(images, before they become latents) or the cached `features` rows of the batch, the REPA loss
on the tokens its hook captured in the forward, `coeff` x that added to the objective's loss;
the projector's own optimizer is stepped with the model's (and skipped with it).
"""

from __future__ import annotations

import math

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from dit.distributed import full_tensor
from dit.models import null_class
from dit.models.repa import RepaTerm
from dit.train.ema import EMA
from dit.train.faults import NO_FAULTS, Faults
from dit.train.randomness import StepRandomness


def take_over_label_dropout(model: nn.Module) -> float:
    """Switch off the model's own random label dropout and return its rate: the training step
    draws the mask itself (from the step's global generator), so that which labels are dropped
    does not depend on the number of ranks. The null-class row stays in the embedding table."""
    embedder = model.y_embedder
    prob = float(embedder.dropout_prob)
    embedder.dropout_prob = 0.0
    return prob


def drop_labels(y: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels with the dropped rows replaced by the null class (classifier-free guidance training)."""
    return torch.where(drop, torch.full_like(y, null_class(num_classes)), y)


class LossScaler:
    """fp16 loss scaling: a `torch.amp.GradScaler` (the scale, its growth tracker) and the steps
    whose update it skipped because the scaled gradient overflowed.

    Such a skip is by design, not a failure: the scaler halves the scale and the next step tries
    again. The step tells it apart from a broken step: the loss is finite, the gradient is not,
    and the scale it ran with was above 1 (at scale <= 1 the gradient overflows unscaled, so the
    step counts as non-finite like any other, and the non-finite guard's limit applies)."""

    def __init__(self, device_type: str, init_scale: float = 65536.0, growth_interval: int = 2000):
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, growth_interval=growth_interval)
        self.skipped_steps = 0  # in total, over the whole run (kept in checkpoints)
        self.skipped = False  # whether the last step was skipped

    @property
    def scale(self) -> float:
        return self.scaler.get_scale()

    def overflowed(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """After `unscale_`: a finite loss, a non-finite gradient, at a scale above 1. One host sync."""
        return self.scale > 1.0 and bool(torch.isfinite(loss) & ~torch.isfinite(grad_norm))

    def state_dict(self) -> dict:
        return {**self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.skipped_steps = int(state.pop("skipped_steps", 0))
        scale = float(state.get("scale", 1.0))
        if not (math.isfinite(scale) and scale > 0):
            # an older run started with loss_scale_init=inf saved this: every step would be skipped again
            raise ValueError(f"the checkpoint's fp16 loss scale is {scale}: every step would overflow and be "
                             "skipped; start this run again with a finite optim.loss_scale_init (e.g. 65536)")
        self.scaler.load_state_dict(state)


def micro_batches(x: torch.Tensor, y: torch.Tensor, r: StepRandomness, k: int) -> Iterator[tuple]:
    """(x, y, r) of each of `k` equal micro-batches of consecutive rows."""
    b = len(x)
    if k < 1 or b % k:
        raise ValueError(f"{b} rows do not split into {k} equal micro-batches")
    m = b // k
    for i in range(k):
        rows = slice(i * m, (i + 1) * m)
        yield x[rows], y[rows], StepRandomness(r.t[rows], r.noise[rows], r.drop[rows],
                                               None if r.posterior is None else r.posterior[rows])


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """The backward passes inside all-reduce (DDP) or reduce-scatter (FSDP2) the gradients only
    if `enabled`; otherwise they accumulate locally until a backward pass that does."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP (forward and backward both inside)
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class StepSetup:
    """The fixed parts of a run's optimizer step: what it trains and how.

    model: what the forward calls (the DiT, or its DDP/FSDP wrapper); `params` its trainable
        parameters (the REPA projector's too). objective: GaussianDiffusion, or dit.flow.FlowMatching
        (the step's r.t are then its continuous times). ema: None for no EMA update.
    grad_clip: clip the global gradient norm to it; None: only measure it.
    autocast_dtype: the forward under torch.autocast in this dtype; None: no autocast.
    accum_steps: micro-batches of b / accum_steps rows each; each loss is divided by
        accum_steps, so the gradient is the mean over all b rows; DDP/FSDP synchronise the
        gradients in the last backward pass only.
    update_if(loss, grad_norm): decides, after the backward pass, whether the optimizer and the
        EMA are updated (the trainer skips non-finite steps on every rank alike); None: always.
        Under `scaler`, a scaler overflow reaches it as a zero gradient norm (not a failure).
    hooks: fault injection (dit/train/faults.py).
    encode(x, r): turns the step's inputs into latents, per micro-batch; None: x0 are latents.
    scaler: fp16 loss scaling; an overflow skips the optimizer and EMA updates (`scaler.skipped`).
    repa: the REPA term (its head hooked on the model), or None. The step's loss is then the
        objective's plus repa.coeff x REPA's; `repa.last_loss` the latter.
    watch: names of the objective's other per-sample terms (e.g. MeanFlow's unweighted "mse",
        whose weighted loss sits near 1 by design) whose mean over the step's rows is kept,
        detached, in `last_terms` after each step, for the metrics; they do not enter the loss.
    """

    model: nn.Module
    objective: object
    opt: torch.optim.Optimizer
    ema: Optional[EMA]
    num_classes: int
    params: list[torch.Tensor]
    grad_clip: Optional[float] = None
    autocast_dtype: Optional[torch.dtype] = None
    accum_steps: int = 1
    update_if: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None
    hooks: Faults = NO_FAULTS
    encode: Optional[Callable[[torch.Tensor, StepRandomness], torch.Tensor]] = None
    scaler: Optional[LossScaler] = None
    repa: Optional[RepaTerm] = None
    watch: tuple[str, ...] = ()
    last_terms: dict = field(default_factory=dict)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The model's optimizer, and REPA's projector's (stepped and skipped with it)."""
        return [self.opt] if self.repa is None else [self.opt, self.repa.opt]


@dataclass
class StepInputs:
    """What changes from step to step: this rank's rows of the global batch and their randomness.

    x0: (b, C, H, W) latents, or what `StepSetup.encode` turns into latents; y: (b,) labels;
    r: the step's randomness (timesteps, noise, which labels to drop); step: the 1-based number
    of the step, for the hooks; features: this rank's cached REPA features (b, T', E) of the
    batch, or None for the encoder's of x0 on the fly."""

    x0: torch.Tensor
    y: torch.Tensor
    r: StepRandomness
    step: int = 0
    features: Optional[torch.Tensor] = None


def train_step(setup: StepSetup, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss, backward, gradient norm (clipped to `grad_clip` if set), AdamW update and EMA
    update on this rank's rows of the global batch. Returns (loss, grad norm) as device tensors
    (no host sync unless `update_if` or `scaler` makes one)."""
    loss = _forward_backward(setup, inputs)
    return _update(setup, loss, inputs.step)


def _forward_backward(setup: StepSetup, inputs: StepInputs) -> torch.Tensor:
    """The backward passes of the step's micro-batches (gradients accumulate in `params`);
    returns the step's loss, detached."""
    model, repa, scaler, hooks, k = setup.model, setup.repa, setup.scaler, setup.hooks, setup.accum_steps
    x0, r, step, features = inputs.x0, inputs.r, inputs.step, inputs.features
    y = drop_labels(inputs.y, r.drop, setup.num_classes)
    for o in setup.optimizers():
        o.zero_grad(set_to_none=True)
    if repa is not None:
        feature_rows = [None] * k if features is None else list(features.chunk(k))
    total, repa_total, watched = None, None, {}
    for i, (xk, yk, rk) in enumerate(micro_batches(x0, y, r, k)):
        fk = repa.features(xk, feature_rows[i]) if repa is not None else None  # of the items, before encoding
        xk = setup.encode(xk, rk) if setup.encode is not None else xk
        with gradient_sync(model, enabled=i == k - 1):
            dtype = setup.autocast_dtype
            with torch.autocast(xk.device.type, dtype=dtype) if dtype is not None else nullcontext():
                losses = setup.objective.training_losses(model, xk, rk.t, model_kwargs={"y": yk}, noise=rk.noise)
                loss = losses["loss"].mean()
                for name in setup.watch:
                    part = losses[name].detach().float().mean() / k
                    watched[name] = part if name not in watched else watched[name] + part
                if repa is not None:  # on the tokens the forward above captured
                    repa_loss = repa.loss(fk)
                    loss = loss + repa.coeff * repa_loss
                    part = repa_loss.detach().float() / k
                    repa_total = part if repa_total is None else repa_total + part
            loss = hooks.loss(step, loss)
            if k > 1:
                loss = loss / k  # the mean over all rows, in parts
            (scaler.scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if repa is not None:
        repa.sync_gradients()  # the projector's gradients, averaged over ranks as DDP does the model's
        repa.forget()
        repa.last_loss = repa_total
    setup.last_terms = watched
    return total


def _update(setup: StepSetup, total: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient norm and clipping, then the optimizer and EMA updates unless `update_if` or an
    fp16 overflow skips them; (loss, grad norm) as float32 device tensors."""
    params, scaler, hooks = setup.params, setup.scaler, setup.hooks
    hooks.gradients(step, params)
    if scaler is not None:
        for o in setup.optimizers():
            scaler.scaler.unscale_(o)  # the true gradients, for the norm and the clipping
    if setup.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, setup.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    loss, grad_norm = total.float(), full_tensor(grad_norm).float()
    overflow = scaler is not None and scaler.overflowed(loss, grad_norm)
    hooks.before_update(step)
    update = setup.update_if is None or setup.update_if(loss, torch.zeros_like(grad_norm) if overflow else grad_norm)
    if update:
        for o in setup.optimizers():
            if scaler is not None:
                scaler.scaler.step(o)  # skips the update itself when the gradient overflowed
            else:
                o.step()
        hooks.after_update(step, params)
        if setup.ema is not None and not overflow:
            setup.ema.update(getattr(setup.model, "module", setup.model))  # DDP's replica: the same parameters
    if scaler is not None:
        scaler.scaler.update()  # halve the scale after an overflow, grow it after growth_interval clean steps
        scaler.skipped = update and overflow
        scaler.skipped_steps += int(scaler.skipped)
    return loss, grad_norm
