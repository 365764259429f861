"""The optimizer: AdamW as the paper trains DiT (constant learning rate, no weight decay), and
the learning rate of each step (warmup, then constant, linear or cosine)."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, o, device: torch.device, parallel: str = "none") -> torch.optim.AdamW:
    """AdamW with the hyperparameters of `o` (an `OptimConfig`: lr, betas, eps, weight_decay,
    fused).

    `o.fused=None` picks torch's fused AdamW kernel (one pass over each tensor's parameter,
    gradient and two moments) on CPU and CUDA: on CPU it is several times faster than the
    default multi-tensor (foreach) kernel, which makes about eight passes (figures in
    benchmarks/README.md). FSDP2's sharded (DTensor) parameters keep the foreach kernel. Both
    kernels compute the same update and keep the same state (step, exp_avg, exp_avg_sq), so a
    run may resume under either."""
    device = torch.device(device)
    fused = o.fused if o.fused is not None else (device.type in ("cpu", "cuda") and parallel != "fsdp")
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=fused or None)


def apply_hyperparameters(opt: torch.optim.Optimizer, o) -> None:
    """Set the config's hyperparameters on every group (after loading a checkpoint's optimizer
    state, whose groups carry the values it was saved with)."""
    for group in opt.param_groups:
        group.update(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def learning_rate(step: int, o, max_steps: int) -> float:
    """The learning rate of step `step` (1-based, as logged) under `o` (an `OptimConfig`).

    With W = o.warmup_steps, D = o.decay_steps (None: `max_steps`), lr = o.lr, m = o.min_lr:

        n <= W:   lr * n / W                                  (linear warmup; step 1 gets lr / W)
        n >  W:   p = min(1, (n - W) / (D - W))
                  constant: lr
                  linear:   m + (lr - m) * (1 - p)
                  cosine:   m + (lr - m) * (1 + cos(pi p)) / 2

    A function of the step alone: a resumed run needs no scheduler state to continue exactly
    (torch's LambdaLR would keep a step counter that the checkpoint would have to carry)."""
    warmup, lr = o.warmup_steps, o.lr
    if step <= warmup:
        return lr * step / warmup
    kind = o.schedule.value
    if kind == "constant":
        return lr
    end = o.decay_steps if o.decay_steps is not None else max_steps
    progress = min(1.0, (step - warmup) / (end - warmup))
    if kind == "linear":
        return o.min_lr + (lr - o.min_lr) * (1.0 - progress)
    if kind == "cosine":
        return o.min_lr + (lr - o.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"optim.schedule={kind!r} is not one of constant, cosine, linear")


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
