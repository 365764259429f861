"""Interpolants x_t = alpha(t) x + sigma(t) eps between data x (t = 0) and noise eps (t = 1), and
the conversions between what a network may predict (velocity, noise, score) at a point x_t.

Time runs from data (t = 0) to noise (t = 1); see the package docstring for why, and for how
SiT's opposite convention is met at the network boundary (`dit.flow.NetworkTime`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Path", "LinearPath", "GVPPath", "PATHS", "get_path", "PREDICTIONS", "expand_time"]

PREDICTIONS = ("velocity", "noise", "score")


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,) -> (B, 1, ..., 1), broadcastable against x (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Path:
    """x_t = alpha(t) x + sigma(t) eps, with alpha(0) = 1, sigma(0) = 0 (data) and alpha(1) = 0,
    sigma(1) = 1 (noise). Subclasses give the four coefficient functions of t (any shape)."""

    name = "path"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """(alpha, sigma, d_alpha, d_sigma) at t (B,), each shaped to broadcast against x."""
        t = expand_time(t, x).to(x.dtype)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    # ---- the training pair ---------------------------------------------------------

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        a, s, _, _ = self.coefficients(t, x0)
        return a * x0 + s * eps

    def velocity_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d x_t / dt = alpha'(t) x0 + sigma'(t) eps (for the linear path: eps - x0)."""
        _, _, da, ds = self.coefficients(t, x0)
        return da * x0 + ds * eps

    # ---- conversions at a point x_t ----------------------------------------------------
    # With x_hat = E[x0 | x_t] and eps_hat = E[eps | x_t], both x_t = alpha x_hat + sigma eps_hat
    # and v = alpha' x_hat + sigma' eps_hat hold; score = -eps_hat / sigma (Tweedie). These are
    # two linear equations in (x_hat, eps_hat), solved below. Every map is affine in the
    # prediction, so classifier-free guidance commutes with it: guiding the raw network output
    # or the converted velocity gives the same result.

    def noise_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s, da, ds = self.coefficients(t, x)
        return (a * v - da * x) / (a * ds - da * s)

    def data_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s, da, ds = self.coefficients(t, x)
        return (ds * x - s * v) / (a * ds - da * s)

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x); singular at t = 0 (sigma = 0), where the samplers never ask for it."""
        _, s, _, _ = self.coefficients(t, x)
        return -self.noise_from_velocity(v, x, t) / s

    def velocity_from_noise(self, eps_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Singular at t = 1 (alpha = 0): noise / score models sample from t_max < 1 (SiT: 1 - 1e-3)."""
        a, s, da, ds = self.coefficients(t, x)
        return (da / a) * x + (ds - da * s / a) * eps_hat

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, s, _, _ = self.coefficients(t, x)
        return self.velocity_from_noise(-s * score, x, t)

    def velocity_from(self, prediction: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity at (x, t) from a network output of kind `prediction` (PREDICTIONS)."""
        if prediction == "velocity":
            return out
        if prediction == "noise":
            return self.velocity_from_noise(out, x, t)
        if prediction == "score":
            return self.velocity_from_score(out, x, t)
        raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(Path):
    """alpha = 1 - t, sigma = t (rectified flow; SiT's "Linear", REPA's "linear")."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.full_like(t, -1.0)

    def d_sigma(self, t):
        return torch.ones_like(t)


class GVPPath(Path):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2): variance preserving for unit-variance data
    (alpha^2 + sigma^2 = 1; SiT's "GVP", REPA's "cosine")."""

    name = "gvp"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS = {"linear": LinearPath, "gvp": GVPPath}


def get_path(name: str | Path) -> Path:
    """A path by name ("linear", "gvp"; case-insensitive, "cosine" is REPA's name for gvp)."""
    if isinstance(name, Path):
        return name
    key = str(name).lower()
    key = {"cosine": "gvp"}.get(key, key)
    if key not in PATHS:
        raise ValueError(f"unknown flow path {name!r}: use one of {sorted(PATHS)}")
    return PATHS[key]()
