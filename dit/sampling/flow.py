"""Samplers for flow models: fixed-step Euler and Heun ODE, Euler-Maruyama SDE with SiT's
diffusion coefficients and last steps, and an adaptive Dormand-Prince ODE (scipy's RK45).

The functions take `velocity(x, t)` (x (B, ...), t (B,) in our convention, t = 1 noise; build it
with `dit.flow.model_velocity`, which can wrap a guidance wrapper around the network) and the
initial noise at t = 1, integrates towards t = 0 (data), and returns `FlowSample(x, nfe)`: nfe is
the number of calls to `velocity` (each is one network batch; a guided one is two halves of it).
The classes at the end put them behind the one sampler interface (dit/sampling/base.py): they
turn the denoiser (the network's output at its own time input) into that velocity with the
trained objective (`FlowMatching.velocity`: its path, prediction and network time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from dit.flow.paths import Path, get_path
from dit.flow.timesteps import shift_time, time_grid
from dit.sampling.base import Sampler, register_sampler
from dit.sampling.settings import DIFFUSION_FORMS, LAST_STEPS

__all__ = ["FlowSample", "ODE_METHODS", "DIFFUSION_FORMS", "LAST_STEPS", "diffusion_coefficient", "sample_ode",
           "sample_ode_adaptive", "sample_sde", "sampling_interval", "SDEForm", "EulerSampler", "HeunSampler", "Dopri5Sampler", "SDESampler"]

ODE_METHODS = ("euler", "heun", "dopri5")


class FlowSample(NamedTuple):
    x: torch.Tensor  # the samples at t = 0 (B, ...)
    nfe: int  # calls to the velocity field


class _Counted:
    """velocity(x, t) with t a float, broadcast to (B,) in x's dtype; counts its calls."""

    def __init__(self, velocity: Callable):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        v = self.velocity(x, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device))
        if v.shape != x.shape:
            raise ValueError(f"the velocity field returned shape {tuple(v.shape)} for x of shape {tuple(x.shape)}")
        return v


def sample_ode(velocity: Callable, noise: torch.Tensor, *, num_steps: int, method: str = "heun",
               t_max: float = 1.0, t_min: float = 0.0, shift: float = 1.0, **adaptive) -> FlowSample:
    """Integrate dx/dt = v(x, t) from t_max (noise) to t_min over `time_grid(num_steps, shift)`.
    euler: one call per step. heun: Euler predictor and trapezoidal corrector, two calls per step
    (on every step, as torchdiffeq's heun2 behind SiT; REPA skips the last corrector). "dopri5"
    hands over to `sample_ode_adaptive` (num_steps is then unused; `adaptive` takes rtol/atol)."""
    if method == "dopri5":
        if shift != 1:
            raise ValueError("a timestep shift only moves a fixed grid: the adaptive dopri5 solver picks its own steps")
        return sample_ode_adaptive(velocity, noise, t_max=t_max, t_min=t_min, **adaptive)
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}: use one of {ODE_METHODS}")
    if adaptive:
        raise TypeError(f"{sorted(adaptive)} apply to method='dopri5' only")
    v = _Counted(velocity)
    grid = time_grid(num_steps, t_max=t_max, t_min=t_min, shift=shift).tolist()
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur  # < 0: towards data
        d_cur = v(x, t_cur)
        x_euler = x + dt * d_cur
        x = x_euler if method == "euler" else x + dt * 0.5 * (d_cur + v(x_euler, t_next))
    return FlowSample(x, v.calls)


def sample_ode_adaptive(velocity: Callable, noise: torch.Tensor, *, rtol: float = 1e-3, atol: float = 1e-6,
                        t_max: float = 1.0, t_min: float = 0.0) -> FlowSample:
    """SiT's default ODE sampler (dopri5, rtol 1e-3, atol 1e-6) through scipy.integrate.solve_ivp's
    RK45 (the same Dormand-Prince 5(4) pair). torchdiffeq, which SiT uses, is not a dependency of
    ours; scipy is, and maintained. The whole batch is one system, so step sizes depend on the
    batch (fixed per block by dit.sampling.order), and every step moves the state through float64
    numpy on the CPU: a reference solver, not a fast one."""
    from scipy.integrate import solve_ivp  # scipy is only needed for this solver

    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"the ODE runs from t_max to t_min with 0 <= t_min < t_max <= 1, got {t_max} -> {t_min}")
    v = _Counted(velocity)
    shape, dtype, device = noise.shape, noise.dtype, noise.device

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        return v(x, t).detach().double().cpu().numpy().reshape(-1)

    y0 = noise.detach().double().cpu().numpy().reshape(-1)
    sol = solve_ivp(rhs, (t_max, t_min), y0, method="RK45", rtol=rtol, atol=atol, t_eval=[t_min])
    if not sol.success:
        raise RuntimeError(f"the adaptive ODE solver failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(device=device, dtype=dtype)
    return FlowSample(x, v.calls)


def diffusion_coefficient(form: str, path: Path | str, t: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """D(t) of the reverse SDE dx = [v - D(t) score] dt + sqrt(2 D(t)) dW (t decreasing), SiT's
    `diffusion_form` choices written in our time (SiT's s = 1 - t): constant (norm), SBDM
    (norm (sigma^2 (-alpha'/alpha) + sigma sigma'), score-based diffusion's own coefficient, t/(1-t) on
    the linear path, infinite at t = 1), sigma (norm sigma(t); REPA's 2t noise on the linear path),
    linear (norm t), decreasing (0.25 (1 - norm cos(pi t))^2: largest at the noise end),
    increasing-decreasing (norm sin(pi t)^2). Every choice has the ODE's marginals."""
    path = get_path(path)
    if form == "constant":
        return torch.full_like(t, float(norm))
    if form == "SBDM":
        a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
        return norm * (s ** 2 * (-da / a) + s * ds)
    if form == "sigma":
        return norm * path.sigma(t)
    if form == "linear":
        return norm * t
    if form == "decreasing":
        return 0.25 * (1 - norm * torch.cos(math.pi * t)) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}: use one of {DIFFUSION_FORMS}")


def _randn_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise like x, drawn on the generator's device; a list of generators gives
    row i from generator i (per-sample noise, as the diffusion samplers do)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} per-sample generators for a batch of {x.shape[0]}")
        return torch.stack([_randn_like(x[i], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(tuple(x.shape), generator=generator, device=device, dtype=x.dtype).to(x.device)


@dataclass(frozen=True)
class SDEForm:
    """Which reverse SDE `sample_sde` walks and how it ends (SiT's choices and defaults): the
    diffusion coefficient D(t) (`diffusion_form`, scaled by `diffusion_norm`; see
    `diffusion_coefficient`) and the noiseless last step from `last_step_size` to t = 0."""

    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str | None = "mean"
    last_step_size: float = 0.04


def sample_sde(velocity: Callable, noise: torch.Tensor, *, path: Path | str, num_steps: int,
               form: SDEForm = SDEForm(), t_max: float = 1.0, t_min: float = 0.0, shift: float = 1.0,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> FlowSample:
    """Euler-Maruyama on dx = [v - D score] dt + sqrt(2 D) dW from t_max down to t_last =
    `form.last_step_size` over num_steps grid points (num_steps - 1 noisy steps, as SiT and
    REPA), then one noiseless last step to t = 0: "mean" (the SDE drift; SiT's and REPA's
    default), "euler" (the ODE velocity), "tweedie" (E[x0 | x_t]), or None (the grid runs to 0,
    no extra call; it stops at `t_min`, SiT's 1 - eps end for noise and score models). SiT's
    defaults are `SDEForm()`'s: sigma, norm 1, mean, 0.04."""
    path = get_path(path)
    diffusion_form, diffusion_norm = form.diffusion_form, float(form.diffusion_norm)
    last_step, last_step_size = form.last_step, form.last_step_size
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}: use one of {LAST_STEPS}")
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion_form {diffusion_form!r}: use one of {DIFFUSION_FORMS}")
    if int(num_steps) < 2:
        raise ValueError(f"the SDE sampler needs num_steps >= 2 (grid points from t_max to the last step), got {num_steps}")
    t_last = float(t_min) if last_step is None else float(last_step_size)
    if not 0 <= t_last < t_max <= 1:
        raise ValueError(f"need 0 <= last_step_size < t_max <= 1, got last_step_size={t_last}, t_max={t_max}")
    if diffusion_form == "SBDM" and t_max >= 1:
        raise ValueError("the SBDM diffusion coefficient is infinite at t = 1 (alpha = 0): set t_max < 1, e.g. 0.999")
    if last_step is not None and t_last == 0:
        raise ValueError(f"last_step={last_step!r} needs last_step_size > 0 (or last_step=None to integrate to 0)")
    v = _Counted(velocity)
    grid = torch.linspace(t_max, t_last, int(num_steps), dtype=torch.float64)
    grid = (grid if shift == 1 else shift_time(grid, shift)).tolist()

    def drift(x, t):  # (v, score, D): the SDE's pieces at (x, t)
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        vel = v(x, t)
        score = path.score_from_velocity(vel, x, tb)
        d = diffusion_coefficient(diffusion_form, path, tb, diffusion_norm).reshape(-1, *([1] * (x.ndim - 1)))
        return vel, score, d

    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur  # < 0
        vel, score, d = drift(x, t_cur)
        x = x + (vel - d * score) * dt + torch.sqrt(2 * d * abs(dt)) * _randn_like(x, generator)
    if last_step is not None:
        t_cur = grid[-1]
        vel, score, d = drift(x, t_cur)
        if last_step == "mean":
            x = x - t_cur * (vel - d * score)
        elif last_step == "euler":
            x = x - t_cur * vel
        else:  # tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha
            x = path.data_from_velocity(vel, x, torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device))
    return FlowSample(x, v.calls)


def sampling_interval(objective) -> tuple[float, float]:
    """(t_min, t_max): the times a flow model is sampled between. Velocity models: all of [0, 1]
    (SiT: its sample_eps is 0 for velocity on the linear and GVP paths). Noise and score models:
    the interval they were trained on, [eps, 1 - eps] with SiT's eps = 1e-3 (its train_eps and
    sample_eps for those predictions; `dit.flow.config.SINGULAR_END_EPS`): turning their output
    into a velocity divides by alpha, which is 0 at t = 1, or by sigma, 0 at t = 0. In SiT's
    time (t = 1 data) that is its `check_interval`'s t0 = eps, t1 = 1 - eps."""
    if objective.prediction == "velocity":
        return 0.0, 1.0
    return float(objective.t_min), float(objective.t_max)


class _FlowSampler(Sampler):
    family = "flow"

    def sample(self, denoiser, noise, *, generator=None, progress=False):
        out = self._integrate(self.objective.velocity(denoiser), noise, generator)
        return out.x, out.nfe

    @property
    def interval(self) -> tuple[float, float]:
        return sampling_interval(self.objective)


class _FixedGridODE(_FlowSampler):
    """The fixed-step ODE solvers on the (optionally shifted) grid; `method` names the scheme."""

    method: str

    def _integrate(self, velocity, noise, generator):
        s = self.settings
        t_min, t_max = self.interval
        return sample_ode(velocity, noise, num_steps=int(s.num_steps), method=self.method, shift=float(s.shift),
                          t_max=t_max, t_min=t_min)


@register_sampler
class EulerSampler(_FixedGridODE):
    """Euler: num_steps evaluations."""

    name = method = "euler"


@register_sampler
class HeunSampler(_FixedGridODE):
    """Heun (Euler predictor, trapezoidal corrector on every step): 2 num_steps evaluations."""

    name = method = "heun"


@register_sampler
class Dopri5Sampler(_FlowSampler):
    """SiT's adaptive Dormand-Prince ODE (rtol, atol); its evaluations are counted per batch."""

    name = "dopri5"

    def _integrate(self, velocity, noise, generator):
        s = self.settings
        t_min, t_max = self.interval
        return sample_ode(velocity, noise, num_steps=int(s.num_steps), method="dopri5", rtol=float(s.rtol),
                          atol=float(s.atol), t_max=t_max, t_min=t_min)


@register_sampler
class SDESampler(_FlowSampler):
    """SiT's Euler-Maruyama reverse SDE with its diffusion form and last step (the flow default)."""

    name = "sde"

    def _integrate(self, velocity, noise, generator):
        s = self.settings
        form = SDEForm(s.diffusion_form, float(s.diffusion_norm), s.last_step, float(s.last_step_size))
        t_min, t_max = self.interval
        return sample_sde(velocity, noise, path=self.objective.path, num_steps=int(s.num_steps), form=form,
                          t_max=t_max, t_min=t_min, shift=float(s.shift), generator=generator)
