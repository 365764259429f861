"""The flow-matching objective: training times, the regression target, the loss; and the
network seen as a velocity field for the samplers (`model_velocity`).

`FlowMatching.training_losses(model, x0, t, model_kwargs, noise)` has the signature of
`GaussianDiffusion.training_losses`, so a training step calls either the same way; its times
come from `FlowMatching.sample_t` instead of integer timesteps.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .paths import PREDICTIONS, Path, get_path
from .timesteps import TIMESTEP_SAMPLING, NetworkTime, sample_logit_normal, sample_uniform

__all__ = ["FlowMatching", "model_velocity", "prediction_channels"]


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    # (B,): mean over every non-batch dimension, as SiT (a (B,) tensor is returned as is: torch
    # reads dim=() as "all dimensions")
    return x if x.ndim == 1 else x.mean(dim=tuple(range(1, x.ndim)))


def prediction_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The prediction in a network output: all of it, or its first half when the network has
    2C output channels (DiT's learned-sigma layout; SiT trains and samples it that way and the
    second half is never used)."""
    c = x.shape[1]
    if out.shape[1] == c:
        return out
    if out.shape[1] == 2 * c:
        return out[:, :c]
    raise ValueError(f"the network returned {out.shape[1]} channels for an input of {c}: a flow model needs "
                     f"{c} (or {2 * c} with learn_sigma, whose second half is ignored)")


def model_velocity(net: Callable, path: Path | str, prediction: str = "velocity",
                   network_time: NetworkTime = NetworkTime()) -> Callable:
    """velocity(x, t) in our convention (t = 1 noise) from `net(x, network_time(t))`, a network
    (or a guidance wrapper around one, which binds the labels) predicting `prediction`. The samplers
    take this callable; guidance may sit inside `net` because every conversion is affine."""
    path = get_path(path)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = prediction_channels(net(x, network_time(t)), x).to(x.dtype)
        if prediction == "velocity":
            return network_time.velocity_sign * out
        return path.velocity_from(prediction, out, x, t)  # noise and score do not depend on time's direction

    return velocity


class FlowMatching:
    """Flow matching on `path` (SiT's transport): x_t = alpha(t) x0 + sigma(t) eps with t from
    `timesteps` ("uniform" on [t_min, t_max], or "logit_normal"(logit_mean, logit_std)), the network
    predicting `prediction` ("velocity": target alpha' x0 + sigma' eps; "noise": eps; "score":
    -eps / sigma, weighted by sigma^2 as SiT's default), loss = mean over all dimensions of the squared error,
    plus `cosine_weight` * (1 - cos(prediction, target)) along channels, averaged over positions
    (LightningDiT's velocity-direction loss, which it adds with weight 1; velocity only).
    `network_time` decides what the timestep embedder receives."""

    def __init__(self, path: str | Path = "linear", prediction: str = "velocity", timesteps: str = "uniform", *,
                 logit_mean: float = 0.0, logit_std: float = 1.0, t_min: float = 0.0, t_max: float = 1.0,
                 cosine_weight: float = 0.0, network_time: NetworkTime = NetworkTime()):
        self.path = get_path(path)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
        if timesteps not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep sampling {timesteps!r}: use one of {TIMESTEP_SAMPLING}")
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"training times need 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")
        if prediction != "velocity" and (t_min <= 0 or t_max >= 1):
            # noise: velocity_from_noise divides by alpha (0 at t = 1); score: the target divides by sigma.
            raise ValueError(f"{prediction} prediction is singular at the ends of [0, 1]: set t_min > 0 and "
                             f"t_max < 1 (SiT uses 1e-3 and 1 - 1e-3)")
        if cosine_weight < 0:
            raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}")
        if cosine_weight and prediction != "velocity":
            raise ValueError("the velocity-direction (cosine) loss needs prediction='velocity'")
        self.prediction, self.timesteps = prediction, timesteps
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.cosine_weight = float(cosine_weight)
        self.network_time = network_time

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> torch.Tensor:
        """(n,) training times in our convention."""
        if self.timesteps == "uniform":
            return sample_uniform(n, t_min=self.t_min, t_max=self.t_max, generator=generator, device=device,
                                  dtype=dtype)
        return sample_logit_normal(n, mean=self.logit_mean, std=self.logit_std, t_min=self.t_min, t_max=self.t_max,
                                   generator=generator, device=device, dtype=dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses, in the network's own convention."""
        if self.prediction == "velocity":
            return self.network_time.velocity_sign * self.path.velocity_target(x0, eps, t)
        if self.prediction == "noise":
            return eps
        _, s, _, _ = self.path.coefficients(t, x0)
        return -eps / s

    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses (B,) at times t (B,): {"loss", "mse"} (+ "cos" with a cosine weight)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.path.interpolate(x0, noise, t)
        out = model(x_t, self.network_time(t), **(model_kwargs or {}))
        return self.losses_from_output(out, x0, x_t, t, noise)

    def losses_from_output(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                           noise: torch.Tensor) -> dict:
        """The loss terms for a network output already computed at (x_t, t)."""
        pred = prediction_channels(out, x0)
        target = self.target(x0, noise, t)
        if self.prediction == "score":
            # SiT's unweighted score loss: (sigma s_hat + eps)^2 = sigma^2 (s_hat - target)^2, bounded as sigma -> 0
            _, s, _, _ = self.path.coefficients(t, x0)
            err = s * pred + noise
        else:
            err = pred - target
        terms = {"mse": _mean_flat(err ** 2)}
        terms["loss"] = terms["mse"]
        if self.cosine_weight:
            # cosine along channels (dim 1) at every position, as LightningDiT; (B, ...) -> (B,)
            terms["cos"] = _mean_flat(1 - F.cosine_similarity(pred, target, dim=1))
            terms["loss"] = terms["mse"] + self.cosine_weight * terms["cos"]
        return terms

    def velocity(self, net: Callable) -> Callable:
        """`model_velocity` for this objective's path, prediction and network time."""
        return model_velocity(net, self.path, self.prediction, self.network_time)

    def __repr__(self) -> str:
        return (f"FlowMatching(path={self.path.name!r}, prediction={self.prediction!r}, timesteps={self.timesteps!r}, "
                f"cosine_weight={self.cosine_weight}, network_time={self.network_time})")
