"""The MeanFlow sampler (Geng et al. 2025, arXiv 2505.13447; docs/meanflow.md): a MeanFlow model
predicts the average velocity u(z_t, r, t) over [r, t], so a step from t to r is the jump

    z_r = z_t - (t - r) u(z_t, r, t)

(official code: meanflow.py:111-113). `num_steps` N jumps on the grid t_i = 1 - i / N (optionally
shifted, `dit.flow.time_grid`), from t = 1 (noise) to t = 0 (data): N network evaluations, one
per jump. N = 1 is the paper's 1-NFE protocol (z_0 = z_1 - u(z_1, 0, 1)), N = 2 its 2-NFE one on
{1, 0.5, 0} (the grid of the iMF code and the PyTorch ports).

Guidance: a MeanFlow model trained with guidance folded in (`meanflow.omega`, `.kappa`, the
default) is already guided: sample it with cfg_scale 1 (one pass of B rows per step). cfg_scale s
!= 1 applies classifier-free guidance on top, on the average velocity, as every sampler does it
(`GuidedDenoiser`: u_null + s (u_cond - u_null), one pass over 2B rows per step, counted as one
evaluation); it is logged once as a warning for such a model.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from dit.flow.timesteps import time_grid
from dit.sampling.base import Sampler, register_sampler

__all__ = ["MeanFlowSampler", "sample_meanflow"]

log = logging.getLogger(__name__)


def sample_meanflow(average_velocity: Callable, noise: torch.Tensor, *, num_steps: int,
                    shift: float = 1.0) -> tuple[torch.Tensor, int]:
    """(x at t = 0, evaluations per sample) from `noise` at t = 1 by `num_steps` MeanFlow jumps
    z_r = z_t - (t - r) u(z_t, r, t) on `time_grid(num_steps, shift=shift)`. `average_velocity`
    (x, r, t) -> u, with r, t (B,) in our time (`MeanFlow.average_velocity`)."""
    grid = time_grid(num_steps, shift=shift).tolist()
    x, calls = noise, 0
    for t, r in zip(grid[:-1], grid[1:]):
        full = lambda v: torch.full((x.shape[0],), float(v), dtype=x.dtype, device=x.device)  # noqa: E731
        u = average_velocity(x, full(r), full(t))
        calls += 1
        if u.shape != x.shape:
            raise ValueError(f"the average velocity has shape {tuple(u.shape)} for x of shape {tuple(x.shape)}")
        x = x - (t - r) * u
    return x, calls


@register_sampler
class MeanFlowSampler(Sampler):
    """MeanFlow's few-step sampler: num_steps jumps with the average velocity (module docstring)."""

    name = "meanflow"
    family = "meanflow"

    def __init__(self, settings, objective):
        super().__init__(settings, objective)
        if not hasattr(objective, "average_velocity"):
            raise TypeError(f"the meanflow sampler needs a MeanFlow objective (a model trained with "
                            f"objective=meanflow), got {type(objective).__name__}")
        options = getattr(objective, "options", None)
        # Autoguidance mixes with a guide model, not the null class the trained-in guidance replaced:
        # its scale is no second CFG, so only the null-class methods (cfg, apg) are warned about.
        null_class = settings.guidance != "autoguidance"
        if float(settings.cfg_scale) != 1 and null_class and options is not None and options.guided:
            log.warning("cfg_scale=%g on a MeanFlow model trained with guidance (omega %g, kappa %g: scale %g) "
                        "guides it again at sampling, with twice the rows per step; the paper samples it with "
                        "cfg_scale=1", float(settings.cfg_scale), options.omega, options.kappa, options.effective_scale)

    def sample(self, denoiser, noise, *, generator=None, progress=False):
        return sample_meanflow(self.objective.average_velocity(denoiser), noise, num_steps=int(self.settings.num_steps),
                               shift=float(self.settings.shift))
