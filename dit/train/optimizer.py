"""The optimizer: AdamW as the paper trains DiT (constant learning rate, no weight decay)."""

from __future__ import annotations

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
