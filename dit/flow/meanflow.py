"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447): the network predicts the
*average* velocity of the flow over an interval, so one evaluation can jump from noise to data.

Conventions (docs/meanflow.md, with the paper's and the official code's lines): our linear path,
z_t = (1 - t) x0 + t eps, v = eps - x0, t = 1 noise (MeanFlow's own). For r <= t,

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,    z_r = z_t - (t - r) u(z_t, r, t),

and u(z, t, t) = v(z, t). Differentiating (t - r) u = integral_r^t v in t (r fixed) gives the
MeanFlow identity u = v - (t - r) du/dt, with du/dt = v . d_z u + d_t u the total derivative
along the flow: a Jacobian-vector product of the network along (v, 0, 1) in (z, r, t). The
training target is u_tgt = v - (t - r) du/dt, stop-gradient, on the network's own du/dt.

The network takes two times (`DiT(time_inputs=2)`): its time input is (B, 2) = NetworkTime of
[t, r] (scale 1: raw t in [0, 1], as MeanFlow's DiT), and it embeds t and h = t - r.

`MeanFlow.training_losses(model, x0, t, model_kwargs, noise)` has the signature of
`FlowMatching.training_losses`, with t (B, 2) = [t, r] from `MeanFlow.sample_t`. For the samplers
it gives `average_velocity(net)` (the meanflow sampler, dit/sampling/meanflow.py) and
`velocity(net)` = u(z, t, t) (the ODE / SDE samplers of dit/sampling/flow.py).

This module, like the rest of dit/flow, imports nothing else of `dit`: the model is any callable
net(x, t_net, y) whose unwrapped module has `config.num_classes` (the null class id is
num_classes: contract 6 in docs/design.md).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .objective import prediction_channels
from .paths import expand_time, get_path
from .timesteps import TIMESTEP_SAMPLING, NetworkTime, sample_logit_normal, sample_uniform

__all__ = ["MeanFlow", "MeanFlowOptions", "MEANFLOW_TIME_INPUTS"]

MEANFLOW_TIME_INPUTS = 2  # DiTConfig.time_inputs of a MeanFlow network: [t, r]


@dataclass(frozen=True)
class MeanFlowOptions:
    """MeanFlow's training options; the defaults are the official ImageNet code's
    (Gsunshine/meanflow meanflow.py:72-84, configs/default.py:57-71), whose guidance
    (omega 1.0, kappa 0.5, on all of [0, 1]) is the MF-B/4 setting of its README (README.md:185:
    FID 19.15 at 80 epochs, 1 NFE; effective scale omega / (1 - kappa) = 2).

    fraction_r_equals_t: the share of each global batch with r = t (plain flow matching; the
        official `data_proportion` 0.75, so 25 % of the samples have r < t).
    omega, kappa: guidance folded into training: the target's velocity is
        omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) (omega 1, kappa 0:
        no guidance), on samples whose t is in `guidance_interval` and whose label was kept.
    norm_p, norm_eps: the adaptive weight w = 1 / (||Delta||^2 + norm_eps)^norm_p, ||Delta||^2 the
        squared error summed over every dimension of a sample (the paper's p and c)."""

    fraction_r_equals_t: float = 0.75
    omega: float = 1.0
    kappa: float = 0.5
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    norm_p: float = 1.0
    norm_eps: float = 0.01

    def __post_init__(self):
        if not 0 <= self.fraction_r_equals_t <= 1:
            raise ValueError(f"fraction_r_equals_t must be in [0, 1], got {self.fraction_r_equals_t}")
        for key in ("omega", "kappa", "norm_p", "norm_eps"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key} must be finite, got {getattr(self, key)}")
        if self.kappa < 0 or self.kappa >= 1:
            raise ValueError(f"kappa must be in [0, 1) (the effective guidance scale is omega / (1 - kappa)), "
                             f"got {self.kappa}")
        if self.omega < 0:
            raise ValueError(f"omega must be >= 0 (1 with kappa 0: no guidance), got {self.omega}")
        if self.norm_p < 0:
            raise ValueError(f"norm_p must be >= 0 (the adaptive weight's power; 0: plain L2), got {self.norm_p}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0 (the adaptive weight's c), got {self.norm_eps}")
        lo, hi = (float(v) for v in self.guidance_interval)
        if len(tuple(self.guidance_interval)) != 2 or not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.guidance_interval}")
        object.__setattr__(self, "guidance_interval", (lo, hi))

    @property
    def guided(self) -> bool:
        """Whether guidance is folded into the training target (omega != 1 or kappa != 0)."""
        return self.omega != 1 or self.kappa != 0

    @property
    def effective_scale(self) -> float:
        """The CFG scale the guided target trains towards: omega / (1 - kappa) (official README.md:187-188)."""
        return self.omega / (1 - self.kappa)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP's replica; FSDP2 and plain modules are their own


def _sum_flat(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=tuple(range(1, x.ndim)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class MeanFlow:
    """The MeanFlow objective on the linear path (module docstring). `timesteps`: how t and r are
    drawn, "logit_normal"(logit_mean, logit_std) (MeanFlow's: -0.4, 1.0) or "uniform" on [0, 1];
    `options`: `MeanFlowOptions`; `network_time`: what the timestep embedders receive (scale * t,
    scale * r; MeanFlow's is scale 1)."""

    prediction = "velocity"  # what the samplers of dit/sampling/flow.py read: u(z, t, t) is a velocity

    def __init__(self, timesteps: str = "logit_normal", *, logit_mean: float = -0.4, logit_std: float = 1.0,
                 options: MeanFlowOptions = MeanFlowOptions(), network_time: NetworkTime = NetworkTime()):
        if timesteps not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep sampling {timesteps!r}: use one of {TIMESTEP_SAMPLING}")
        if not logit_std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {logit_std}")
        if network_time.data_at_one:
            raise ValueError("a MeanFlow network learns our time (t = 1 noise): data_at_one is not supported")
        self.path = get_path("linear")
        self.timesteps = timesteps
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.options = options
        self.network_time = network_time
        self.t_min, self.t_max = 0.0, 1.0

    # ---- times

    def _draw(self, n: int, generator, device, dtype) -> torch.Tensor:
        if self.timesteps == "uniform":
            return sample_uniform(n, generator=generator, device=device, dtype=dtype)
        return sample_logit_normal(n, mean=self.logit_mean, std=self.logit_std, generator=generator, device=device,
                                   dtype=dtype)

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> torch.Tensor:
        """(n, 2) = [t, r]: two independent draws, t the larger and r the smaller (official
        meanflow.py:147-150), then r = t on exactly round(fraction_r_equals_t * n) rows. The
        official code sets the first rows of its batch; here the rows are a random choice from the
        same generator, so that the ranks' strided rows and the micro-batches all see both kinds
        and the draw depends only on the step's generator (dit/train/randomness.py)."""
        a = self._draw(n, generator, device, dtype)
        b = self._draw(n, generator, device, dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.zeros(n, dtype=torch.bool, device=t.device)
        k = int(round(self.options.fraction_r_equals_t * n))
        order = torch.rand(n, generator=generator, device=device).argsort()
        equal[order[:k]] = True
        return torch.stack([t, torch.where(equal, t, r)], dim=1)

    def network_input(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B, 2): what the network's two time inputs receive for our [t, r]."""
        return self.network_time(torch.stack([t, r], dim=1))

    # ---- the network as the average and the instantaneous velocity

    def average_velocity(self, net: Callable) -> Callable:
        """u(x, r, t) (r, t (B,), our time) from `net(x, t_net)` (a network with its labels bound,
        or a guidance wrapper); a 2C-channel output is read as its first C (learned-sigma layout)."""

        def u(x: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return prediction_channels(net(x, self.network_input(t, r)), x).to(x.dtype)

        return u

    def velocity(self, net: Callable) -> Callable:
        """The instantaneous velocity v(x, t) = u(x, t, t) for the ODE / SDE samplers."""
        u = self.average_velocity(net)
        return lambda x, t: u(x, t, t)

    # ---- the training target

    def null_label(self, model) -> int:
        return int(_unwrap(model).config.num_classes)  # contract 6: the null class is num_classes

    def target_velocity(self, model, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
        """The velocity the target is built on (and the JVP's tangent in z): v = eps - x0, or with
        guidance folded in (options.omega, .kappa) omega v + kappa u(z, t, t | y) +
        (1 - omega - kappa) u(z, t, t | null) on the rows whose label was kept and whose t is in the
        guidance interval (official meanflow.py:171-200; the paper's Sec. 4.2 and its appendix).
        The network passes run without autograd on the unwrapped module: they sit inside the
        stop-gradient target."""
        o = self.options
        if not o.guided:
            return v
        net = _unwrap(model)
        null = self.null_label(model)
        lo, hi = o.guidance_interval
        guided = (y != null) & (t >= lo) & (t <= hi)
        tt = self.network_input(t, t)  # h = 0: the instantaneous velocity
        nulls = torch.full_like(y, null)
        with torch.no_grad():
            if o.kappa == 0:  # the conditional pass is not needed (official meanflow.py:172-177)
                u_null = prediction_channels(net(z, tt, nulls), z).to(v.dtype)
                u_cond = torch.zeros_like(v)
            else:  # both passes as one batch: conditional rows, then null rows
                out = prediction_channels(net(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, nulls])),
                                          torch.cat([z, z])).to(v.dtype)
                u_cond, u_null = out.chunk(2)
        v_guided = o.omega * v + o.kappa * u_cond + (1 - o.omega - o.kappa) * u_null
        return torch.where(expand_time(guided, v), v_guided, v)

    def time_derivative(self, model, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
                        tangent: torch.Tensor) -> torch.Tensor:
        """du/dt = tangent . d_z u + d_t u at (z, r, t): the forward-mode JVP of the network along
        (tangent, 0, 1) in (z, r, t) (`torch.func.jvp`; official meanflow.py:226-231). Exact, so:
        on the unwrapped module (a DDP/FSDP wrapper's forward is for the gradient-carrying pass; no
        gradient flows through this one, the target is stop-gradient), without autograd, in
        float32 (autocast off, as py-meanflow's JVP), and with the math attention kernel (the fused
        SDPA kernels have no forward-mode derivative on every device)."""
        net = _unwrap(model)
        tr = self.network_input(t, r)
        # d(network input)/dt along (t: 1, r: 0): the scale on t's column, nothing on r's
        d_tr = torch.stack([torch.full_like(t, self.network_time.scale), torch.zeros_like(r)], dim=1)

        def u(z_, tr_):
            return prediction_channels(net(z_, tr_, y), z_)

        float32 = z.dtype in (torch.float16, torch.bfloat16)
        if float32:
            z, tangent, tr, d_tr = z.float(), tangent.float(), tr.float(), d_tr.float()
        autocast_off = torch.autocast(z.device.type, enabled=False) if torch.is_autocast_enabled(z.device.type) \
            else nullcontext()
        with torch.no_grad(), autocast_off, sdpa_kernel(SDPBackend.MATH):
            _, dudt = torch.func.jvp(u, (z, tr), (tangent, d_tr))
        return dudt

    def target(self, model, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """u_tgt = v~ - (t - r) du/dt (v~ = `target_velocity`, du/dt along (v~, 0, 1)), detached
        (official meanflow.py:235-236; the clip of t - r to [0, 1] there never acts, t >= r)."""
        z = self.path.interpolate(x0, noise, t)
        v = self.path.velocity_target(x0, noise, t)  # eps - x0
        v_tilde = self.target_velocity(model, z, t, v, y)
        dudt = self.time_derivative(model, z, t, r, y, v_tilde)
        return (v_tilde - expand_time(t - r, v_tilde) * dudt.to(v_tilde.dtype)).detach()

    # ---- the loss

    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses (B,) at times t (B, 2) = [t, r]: {"loss": the adaptively weighted
        loss, "mse": the unweighted squared error, a mean over dimensions (docs/flow.md's scale)}.
        `model_kwargs["y"]` holds the labels after label dropout (null class = dropped). The network
        is called up to three times per step (guidance, JVP, the gradient-carrying forward), so
        label dropout must be the caller's, as the trainer's is (`take_over_label_dropout`): a
        model dropping labels itself in training mode would drop different ones in each call."""
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"MeanFlow trains on time pairs t (B, 2) = [t, r] (MeanFlow.sample_t), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        y = (model_kwargs or {})["y"]
        t_, r = t[:, 0], t[:, 1]
        u_tgt = self.target(model, x0, t_, r, y, noise)
        z = self.path.interpolate(x0, noise, t_)
        # The gradient-carrying pass goes through `model` itself (DDP / FSDP wrappers sync its gradients).
        u = prediction_channels(model(z, self.network_input(t_, r), y), x0)
        return self.losses_from_output(u, u_tgt)

    def losses_from_output(self, u: torch.Tensor, u_tgt: torch.Tensor) -> dict:
        """The adaptive loss of the paper (Sec. 4.3) as its code computes it (official
        meanflow.py:238-246): L = ||u - u_tgt||^2 summed over C, H, W; loss = L / sg((L + c)^p).
        Our flow loss is a mean over dimensions: the sum is used here, inside the weight and out,
        so that c (norm_eps) has the official value's meaning; with p = 1 the loss is L / (L + c),
        below 1 (docs/meanflow.md). "mse" is the mean over dimensions, for comparison with flow runs."""
        dtype = torch.promote_types(u.dtype, torch.float32)  # bf16 / fp16 outputs: the loss in float32
        sq = (u.to(dtype) - u_tgt.to(dtype)) ** 2
        l2 = _sum_flat(sq)
        weight = (l2.detach() + self.options.norm_eps) ** (-self.options.norm_p)
        return {"loss": weight * l2, "mse": _mean_flat(sq)}

    def __repr__(self) -> str:
        return (f"MeanFlow(timesteps={self.timesteps!r}, logit_mean={self.logit_mean}, logit_std={self.logit_std}, "
                f"options={self.options}, network_time={self.network_time})")
