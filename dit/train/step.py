"""One optimizer step of DiT, as a plain function: what the trainer and the benchmarks call.

    r = step_randomness(seed, step, B, latent_shape, diffusion.num_timesteps, drop_prob, rank, world, device)
    loss, grad_norm = train_step(model, diffusion, opt, ema, x0, y, r, num_classes=K, params=params)

No config object and no I/O: the caller hands in the model (or its DDP/FSDP wrapper), the
diffusion, the optimizer, the EMA, a batch of latents and the step's randomness. Fault injection
for the crash tests comes in as one hooks object (`dit/train/faults.py`), a no-op by default.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn as nn

from dit.distributed import full_tensor
from dit.models import null_class
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


def train_step(
    model: nn.Module, diffusion, opt: torch.optim.Optimizer, ema: Optional[EMA], x0: torch.Tensor,
    y: torch.Tensor, r: StepRandomness, *, num_classes: int, params: list[torch.Tensor],
    grad_clip: Optional[float] = None, autocast_dtype: Optional[torch.dtype] = None,
    update_if: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None,
    hooks: Faults = NO_FAULTS, step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss, backward, gradient norm (clipped to `grad_clip` if set), AdamW update and EMA
    update on this rank's rows of the global batch. Returns (loss, grad norm) as device tensors
    (no host sync unless `update_if` makes one).

    model: what the forward calls (the DiT, or its DDP/FSDP wrapper); `params` its trainable
        parameters. x0: (b, C, H, W) latents; y: (b,) labels; r: the step's randomness (timesteps,
        noise, which labels to drop).
    update_if(loss, grad_norm): decides, after the backward pass, whether the optimizer and the
        EMA are updated (the trainer skips non-finite steps on every rank alike); None: always.
    step: the 1-based number of this step, for the hooks.
    """
    y = drop_labels(y, r.drop, num_classes)
    with torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
        losses = diffusion.training_losses(model, x0, r.t, model_kwargs={"y": y}, noise=r.noise)
        loss = losses["loss"].mean()
    loss = hooks.loss(step, loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.gradients(step, params)
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    loss, grad_norm = loss.detach().float(), full_tensor(grad_norm).float()
    hooks.before_update(step)
    if update_if is None or update_if(loss, grad_norm):
        opt.step()
        hooks.after_update(step, params)
        if ema is not None:
            ema.update(getattr(model, "module", model))  # DDP's replica: the same parameters
    return loss, grad_norm
