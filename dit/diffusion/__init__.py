"""Gaussian diffusion, the objective: schedules, respacing, the hybrid loss, and the chain's own
step arithmetic (posterior means and variances; `p_sample_loop` / `ddim_sample_loop` keep the
reference release's names, so code ported from it runs). The samplers that sample.py, eval_fid.py
and training reach are built on them behind the one interface in dit/sampling/diffusion.py.

`create_diffusion` keeps the reference release's signature so code ported from it runs
unchanged; our own code uses the same object.
"""

from __future__ import annotations

from .gaussian import GaussianDiffusion, LossType, MeanType, VarType
from .schedule import linear_betas, named_betas, space_timesteps

__all__ = [
    "GaussianDiffusion", "LossType", "MeanType", "VarType",
    "create_diffusion", "linear_betas", "named_betas", "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | int | list[int] | None = None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """A diffusion over `diffusion_steps` base steps, respaced as `timestep_respacing`
    ("" or None: all steps, for training; "250": DiT's sampler; "ddim50": DDIM)."""
    betas = named_betas(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        use_timesteps = None
    else:
        use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    return GaussianDiffusion(
        betas,
        use_timesteps=use_timesteps,
        mean_type=MeanType.START_X if predict_xstart else MeanType.EPSILON,
        var_type=VarType.LEARNED_RANGE if learn_sigma else (VarType.FIXED_SMALL if sigma_small else VarType.FIXED_LARGE),
        loss_type=loss_type,
    )
