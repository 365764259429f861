"""Flow matching (SiT, REPA, LightningDiT objectives) and MeanFlow (`meanflow.py`, docs/meanflow.md):
interpolants, targets, timestep sampling, and the losses; the samplers that integrate a flow model are in dit/sampling/flow.py. Contract 7 in docs/design.md; the user's guide is docs/flow.md.

Time convention, once for the whole package: t in [0, 1], t = 0 is data and t = 1 is noise,

    x_t = alpha(t) x0 + sigma(t) eps,   linear: alpha = 1 - t, sigma = t;   GVP: cos / sin(pi t / 2),

and the velocity is d x_t / dt (linear path: eps - x0), so samplers integrate from t = 1 down to
t = 0. This is REPA's and SD3's direction and the direction of DDPM time (contract 5: t = 999 is
noise, so t_ddpm ~ 1000 t here). SiT and LightningDiT run the other way (their s = 1 - t, s = 1 is
data, velocity x0 - eps); their weights are met at the network boundary by `NetworkTime`
(`data_at_one=True`: the network receives 1 - t and its velocity is negated), nowhere else.

What the network's timestep embedder receives is `NetworkTime.scale * t` (or of 1 - t): scale 1
as SiT, REPA and LightningDiT do (t in [0, 1] straight into DiT's sin-cos embedder), or 1000 for
DDPM-sized inputs. A flow model records its NetworkTime (`to_dict`) next to its weights.

Wiring: `FlowMatching(...).training_losses(model, x0, t, model_kwargs, noise)` has the signature of
`GaussianDiffusion.training_losses` (t from `FlowMatching.sample_t`); for sampling,
`FlowMatching(...).velocity(denoiser)` turns any `denoiser(x, t_net)` (the network, or a guidance
wrapper that binds the labels) into the `velocity(x, t)` every sampler here takes.
"""

from .meanflow import MeanFlow, MeanFlowOptions
from .objective import FlowMatching, model_velocity, prediction_channels
from .paths import PATHS, PREDICTIONS, GVPPath, LinearPath, Path, expand_time, get_path
from .timesteps import (SIT_TIME, TIMESTEP_SAMPLING, NetworkTime, sample_logit_normal, sample_uniform, shift_time,
                        time_grid)

__all__ = [
    "FlowMatching", "model_velocity", "prediction_channels", "MeanFlow", "MeanFlowOptions",
    "PATHS", "PREDICTIONS", "Path", "LinearPath", "GVPPath", "get_path", "expand_time",
    "NetworkTime", "SIT_TIME", "TIMESTEP_SAMPLING", "sample_uniform", "sample_logit_normal", "shift_time", "time_grid",
]
