"""Settings in, a sampler out: `build_sampler` resolves a run's `SamplerSettings` once, against
the objective the checkpoint was trained with (and the autoencoder, which decides x0 clipping),
and returns the `Sampler` (dit/sampling/base.py) that every later call uses. Importing this module
registers the built-in samplers (diffusion.py: ddpm, ddim, dpm++; flow.py: euler, heun, dopri5,
sde; meanflow.py: meanflow); a plugin registers its own class with `dit.sampling.base.register_sampler`.
"""

from __future__ import annotations

from dit.sampling import diffusion as _diffusion_samplers  # noqa: F401  (registers ddpm, ddim, dpm++)
from dit.sampling import flow as _flow_samplers  # noqa: F401  (registers euler, heun, dopri5, sde)
from dit.sampling import meanflow as _meanflow_samplers  # noqa: F401  (registers meanflow)
from dit.sampling.base import Sampler, sampler_class
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import objective_kind

__all__ = ["build_sampler", "Sampler"]


def build_sampler(settings: SamplerSettings, objective, autoencoder=None, *, guide=None) -> Sampler:
    """The sampler that `settings` describe for a model trained on `objective` (a
    `GaussianDiffusion` chain, a `FlowMatching` or a `MeanFlow`; see
    `dit.sampling.trained.trained_objective`): `auto` becomes the objective's default sampler, a
    sampler that does not fit the objective raises `SamplerMismatchError`, `clip_denoised` None is decided for `autoencoder` (given one), and
    every field is checked, here and only here. `settings` that already went through this give
    the same sampler again. `guide`: the guide model of guidance=autoguidance (required there,
    refused otherwise; `dit.sampling.guidance.guide_mismatch` says whether it fits the model),
    held by the sampler as `sampler.guide` for the denoiser every draw builds."""
    if objective is None:
        raise ValueError("build_sampler needs the trained objective (dit.sampling.trained.trained_objective): "
                         "a diffusion chain or a flow objective, not None")
    settings = settings.for_objective(objective_kind(objective))
    if autoencoder is not None:
        settings = settings.resolved(autoencoder)
    settings.check()
    if settings.guidance == "autoguidance" and guide is None:
        raise ValueError("guidance=autoguidance needs a guide model: give guide_checkpoint= (an earlier or smaller "
                         "model of the same data and objective)")
    if settings.guidance != "autoguidance" and guide is not None:
        raise ValueError(f"a guide model is only used by guidance=autoguidance, not guidance={settings.guidance}")
    cls = sampler_class(settings.sampler)
    if cls is None:  # a name the settings accept but no class claims (a plugin not registered in this process)
        raise ValueError(f"no sampler class is registered for sampler={settings.sampler}: register it with "
                         "dit.sampling.base.register_sampler before sampling")
    sampler = cls(settings, objective)
    sampler.guide = guide
    return sampler
