"""EMA: the exponential moving average of the weights that DiT samples and is scored with."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of a model's parameters, held as a second model (same class,
    same state-dict keys: the official layout), never trained and always in eval mode.

    `update` is one fused `torch._foreach_lerp_` over all tensors instead of a Python loop of
    `mul_`/`add_` pairs: ema += (1 - decay) * (param - ema)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        # Under FSDP both models are sharded alike and these are matching local shards.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
