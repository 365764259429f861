"""Guidance, in one place for every sampler: `GuidedDenoiser` binds the labels to the network and,
at a guided step, mixes two predictions as the settings say. Three methods (`settings.guidance`;
docs/sampling.md, "Guidance methods"), each at scale w = `cfg_scale`, on the guided channels
(contract 6 in docs/design.md: "3" reproduces DiT's numbers, "all" is the principled choice) and
only inside the optional guidance interval (Kynkäänniemi et al. 2024), in DDPM timesteps for
diffusion samplers and in flow time for flow and MeanFlow samplers:

- cfg, classifier-free guidance: D_null + w (D_cond - D_null), the conditional and the null-class
  passes as one batch through `DiT.forward_with_cfg`.
- autoguidance (Karras et al. 2024, arXiv 2406.02507; NVlabs/edm2 generate_images.py:82-87):
  D_guide + w (D - D_guide), where the guide is a weaker model of the same task (smaller, or
  trained for less), called with the same labels at the same (x, t): a conditional model, so the
  main model needs no null class. Every parametrisation we sample (epsilon, x0, velocity, noise,
  score, MeanFlow's average velocity) is affine in D at a fixed (x, t), with the same map for both
  networks, so the mix is taken on the network outputs as they are.
- apg, adaptive projected guidance (Sadat, Hilliges, Weber 2024, arXiv 2410.02416): CFG's
  difference taken in the denoised (x0) space, dD = D_cond - D_uncond, with reverse momentum
  (dD <- dD + beta dD_prev, the running value), a clamp of its norm per sample to r, and its part
  parallel to D_cond (per sample, flattened) scaled by eta: D_cond + (w - 1)(dD_perp + eta dD_par).
  The outputs are turned into x0 with the objective's own conversions (`DenoisedMap`) and the
  update back into the output's units; eta 1 with no clamp and no momentum is exactly CFG.

`cfg_scale == 1` skips the second pass entirely (the null class or the guide), and so does any
step outside the interval: the model's conditional output alone.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from dit.autoencoder import warn_partial_guidance
from dit.flow import NetworkTime
from dit.flow.config import objective_kind
from dit.flow.paths import expand_time
from dit.models import null_class, parse_guided_channels
from dit.sampling.precision import forward_precision
from dit.sampling.settings import SamplerSettings

__all__ = ["GuidedDenoiser", "ProjectedGuidance", "DenoisedMap", "guide_mismatch", "unwrap_model", "eval_mode"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)  # DDP / FSDP wrappers


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,): the inner product of each sample's values, flattened."""
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


class ProjectedGuidance:
    """APG's update of the x0 difference over the guided evaluations of one sampling run (Sadat et
    al. 2024, arXiv 2410.02416), holding the momentum buffer (a new run, a new instance):

        running = dD + momentum * running_prev    (the paper's reverse momentum for momentum < 0;
                                                   the first guided evaluation: running = dD)
        dD <- running * min(1, r / ||running||)   (r = norm_threshold, per sample; None: no clamp)
        dD_par = (<dD, D_cond> / ||D_cond||^2) D_cond,  dD_perp = dD - dD_par   (per sample, flattened)
        update = dD_perp + eta * dD_par

    in float64. The guided prediction is then D_cond + (w - 1) update."""

    def __init__(self, eta: float = 0.0, norm_threshold: float | None = None, momentum: float = 0.0):
        self.eta, self.norm_threshold, self.momentum = float(eta), norm_threshold, float(momentum)
        self.running: torch.Tensor | None = None

    def __call__(self, d_cond: torch.Tensor, delta: torch.Tensor,
                 active: torch.Tensor | None = None) -> torch.Tensor:
        """The update for x0 differences `delta` (B, ...) against the conditional x0 `d_cond`.
        `active` (B,) bool: rows where x0 depends on the output (False where it does not, e.g. a
        velocity model at t = 0: x0 = x_t whatever the output; `delta` is then in the output's own
        units and only projected, without momentum or clamp, and the buffer keeps its value)."""
        d_cond, delta = d_cond.double(), delta.double()
        on = None if active is None else _per_sample(active, delta)
        if self.momentum:
            running = delta if self.running is None else delta + self.momentum * self.running
            if on is not None:
                kept = torch.zeros_like(delta) if self.running is None else self.running
                self.running = torch.where(on, running, kept)
                delta = torch.where(on, running, delta)
            else:
                self.running = delta = running
        if self.norm_threshold is not None:
            norm = delta.flatten(1).norm(dim=1)
            factor = torch.where(norm > self.norm_threshold, self.norm_threshold / norm.clamp_min(1e-300),
                                 torch.ones_like(norm))
            if active is not None:
                factor = torch.where(active, factor, torch.ones_like(factor))
            delta = delta * _per_sample(factor, delta)
        sq = _flat_dot(d_cond, d_cond)
        coef = torch.where(sq > 0, _flat_dot(delta, d_cond) / sq.clamp_min(1e-300), torch.zeros_like(sq))
        parallel = _per_sample(coef, delta) * d_cond
        return delta - (1.0 - self.eta) * parallel


class DenoisedMap:
    """What a network output means as a denoised x0 at (x_t, t), for APG: the objective's own
    conversion D(out) and the factor B of the affine map, D(out) = A(x_t, t) + B(t) out (B per
    sample, the same for every channel), so that an x0-space update dD' becomes B^-1 dD' in the
    output's units.

    Diffusion (`network_time` None; t the original DDPM timesteps): epsilon prediction,
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (`GaussianDiffusion.predict_xstart_from_eps`), B =
    -sqrt(1 / abar - 1); x0 prediction, B = 1. Flow and MeanFlow (t the network's time input, our
    flow time through `network_time`; a MeanFlow input (B, 2) is read at its t): the output as a
    velocity (`Path.velocity_from`, the sign of a reversed-time network undone), then
    x0 = `Path.data_from_velocity` (x_t - t v on the linear path), so B = -s / (a ds' - a' s) for a
    velocity (-t on the linear path), -s / a for noise, s^2 / a for score. A MeanFlow model's
    average velocity u(z, r, t) is read as this velocity (x0 = z_t - t u: exact at r = t, and for the
    one-step jump r = 0 it is the jump's own result)."""

    def __init__(self, objective, network_time: NetworkTime | None):
        self.kind = objective_kind(objective)
        self.objective, self.network_time = objective, network_time
        if self.kind == "diffusion":
            self.steps = torch.as_tensor(np.asarray(objective.timestep_map), dtype=torch.long)
            self.epsilon = objective.mean_type.value == "epsilon"
        else:
            self.path, self.prediction = objective.path, objective.prediction
            self.sign = (network_time or NetworkTime()).velocity_sign

    def _chain_index(self, t_net: torch.Tensor) -> torch.Tensor:
        """Original DDPM timesteps -> the indices of the objective's chain (itself when not respaced)."""
        steps = self.steps.to(t_net.device)
        k = torch.searchsorted(steps, t_net.long()).clamp_max(len(steps) - 1)
        if not bool((steps[k] == t_net.long()).all()):
            raise ValueError(f"timestep {t_net.tolist()} is not one of the chain's {len(steps)} timesteps")
        return k

    def _flow_time(self, t_net: torch.Tensor) -> torch.Tensor:
        first = t_net if t_net.ndim == 1 else t_net[:, 0]
        return self.network_time.flow_time(first.double())

    def __call__(self, out: torch.Tensor, x: torch.Tensor, t_net: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D (B, ...) the x0 the output `out` stands for at (x, t), B (B,) its factor)."""
        if self.kind == "diffusion":
            k = self._chain_index(t_net)
            if not self.epsilon:
                return out, torch.ones(len(out), dtype=torch.float64, device=out.device)
            d = self.objective.predict_xstart_from_eps(x, k, out)
            b = -torch.from_numpy(self.objective.sqrt_recipm1_alphas_cumprod).to(out.device)[k]
            return d, b
        t = self._flow_time(t_net).to(device=out.device)
        x64, out64 = x.double(), out.double()
        v = self.path.velocity_from(self.prediction, self.sign * out64 if self.prediction == "velocity" else out64,
                                    x64, t)
        d = self.path.data_from_velocity(v, x64, t)
        tt = expand_time(t, x64)
        a, s, da, ds = self.path.alpha(tt), self.path.sigma(tt), self.path.d_alpha(tt), self.path.d_sigma(tt)
        if self.prediction == "velocity":
            b = -self.sign * s / (a * ds - da * s)
        elif self.prediction == "noise":
            b = -s / a
        else:
            b = s ** 2 / a
        return d, b.reshape(-1)


class GuidedDenoiser:
    """fn(x (B, C, H, W), t (B,) the network's timestep input) -> the network output (B, C_out,
    H, W) with guidance applied as `settings` say (module docstring). Counts network passes
    (`calls`) and rows (`rows`): a guided step is one pass over 2B rows (cfg, apg: the conditional
    and the null-class halves; autoguidance: B rows through the model and B through the guide), an
    unguided one a pass over B rows.

    `network_time`: None for a diffusion model (t: original DDPM timesteps, compared with the
    guidance interval as integers); a flow model's `NetworkTime`, which maps the network's input
    back to our flow time t in [0, 1] (t = 1 noise), the time its guidance interval is given in.
    `guide`: the guide model of guidance=autoguidance (and only then). `objective`: what the
    sampler walks (its `objective`), which guidance=apg needs to read outputs as x0 (`DenoisedMap`)."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, settings: SamplerSettings,
                 network_time: NetworkTime | None = None, *, guide: Optional[torch.nn.Module] = None,
                 objective=None):
        self.model = model
        self.precision = settings.precision
        num_classes = model.config.num_classes
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{num_classes - 1}")
        self.method = getattr(settings, "guidance", "cfg")
        self.guided = float(settings.cfg_scale) != 1.0
        if self.method == "autoguidance":
            if guide is None:
                raise ValueError("guidance=autoguidance needs a guide model (sample.py, eval_fid.py: "
                                 "guide_checkpoint=, an earlier or smaller model of the same data and objective)")
            guide = unwrap_model(guide)
            mismatch = _shape_mismatch(model, guide)
            if mismatch:
                raise ValueError(f"the guide model cannot guide this model: {mismatch}")
        elif guide is not None:
            raise ValueError(f"a guide model is only used by guidance=autoguidance, not guidance={self.method}")
        elif self.guided and model.y_embedder.embedding_table.num_embeddings <= num_classes:
            raise ValueError("cfg_scale != 1 needs the null-class embedding, but this model was built with "
                             "class_dropout_prob=0: sample with cfg_scale=1 (or guidance=autoguidance, whose guide is "
                             "conditional)")
        self.guide = guide
        self.apg = self.denoised = None
        if self.method == "apg":
            if objective is None:
                raise ValueError("guidance=apg needs the objective the sampler walks (GuidedDenoiser(objective=...)): "
                                 "it reads the outputs as x0")
            self.apg = ProjectedGuidance(settings.apg_eta, settings.apg_clamp, settings.apg_momentum)
            self.denoised = DenoisedMap(objective, network_time)
        interval = settings.guidance_interval
        self.labels = labels
        self.null = torch.full_like(labels, null_class(num_classes))
        self.cfg_scale = float(settings.cfg_scale)
        self.guided_channels = parse_guided_channels(settings.guided_channels_value, model.config.in_channels)
        if self.guided:  # "3" on a latent space other than SD's 4 channels guides an arbitrary subset
            warn_partial_guidance(settings.guided_channels_value, model.config.in_channels)
        self.network_time = network_time
        if interval is None:
            self.interval = None
        elif network_time is None:
            self.interval = (int(interval[0]), int(interval[1]))
        else:
            self.interval = (float(interval[0]), float(interval[1]))
        self.calls = self.rows = 0

    def guides_at(self, t: int | float) -> bool:
        """Whether the step at t is guided: an original timestep (diffusion) or our flow time."""
        if not self.guided:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def step_time(self, t: torch.Tensor) -> int | float:
        """The time of a batch's step in the interval's units: DDPM time read as an integer
        (diffusion), our flow time as a float (flow; the network may see 1 - t or 1000 t). A
        MeanFlow network's input is (B, 2) = [t, r]: its step is at t, where the jump starts."""
        if self.network_time is None:
            return int(t[0])
        first = t[0] if t.ndim == 1 else t[0, 0]
        return float(self.network_time.flow_time(first.double()))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_unused) -> torch.Tensor:
        self.calls += 1
        # All samples of a batch are at the same step, so one decision serves the batch.
        guided = self.guides_at(self.step_time(t))
        self.rows += (2 if guided else 1) * len(x)
        # bf16 autocasts the network (with forward_with_cfg's guidance mix); the chain gets float32.
        with forward_precision(self.precision, x.device):
            if not guided:
                return self.model(x, t, self.labels).float()
            if self.method == "autoguidance":
                main, weak = self.model(x, t, self.labels), self.guide(x, t, self.labels)
            else:
                both = torch.cat([x, x])  # (2B, C, H, W): conditional half, then unconditional half
                if self.method == "cfg":
                    out = self.model.forward_with_cfg(both, torch.cat([t, t]), torch.cat([self.labels, self.null]),
                                                      self.cfg_scale, self.guided_channels)
                    return out[: len(x)].float()  # both halves hold the same guided output
                cond, uncond = self.model(both, torch.cat([t, t]), torch.cat([self.labels, self.null])).chunk(2)
        if self.method == "autoguidance":
            return self._autoguided(main.float(), weak.float())
        return self._projected(cond.float(), uncond.float(), x, t)

    def _autoguided(self, main: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
        """D_guide + w (D - D_guide) on the guided channels; the model's own output elsewhere."""
        g = self.guided_channels
        out = main.clone()
        out[:, :g] = weak[:, :g] + self.cfg_scale * (main[:, :g] - weak[:, :g])
        return out

    def _projected(self, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """APG on the guided channels: D_cond + (w - 1) update(D_cond, dD), in the output's units
        out_cond + (w - 1) update / B (`DenoisedMap`); the conditional output elsewhere."""
        g = self.guided_channels
        d_cond, b = self.denoised(cond[:, :g], x[:, :g], t)
        b = b.double()
        active = b != 0  # x0 does not depend on the output there (a velocity model at t = 0)
        unit = torch.where(active, b, torch.ones_like(b)).reshape(-1, *([1] * (x.ndim - 1)))
        diff = cond[:, :g].double() - uncond[:, :g].double()
        update = self.apg(d_cond, unit * diff, None if bool(active.all()) else active)
        out = cond.clone()
        out[:, :g] = (cond[:, :g].double() + (self.cfg_scale - 1.0) * update / unit).float()
        return out


def _shape_mismatch(model: torch.nn.Module, guide: torch.nn.Module) -> str | None:
    """Why `guide` cannot be called where `model` is (classes, latent shape, time inputs), or None."""
    a, b = model.config, guide.config
    if a.num_classes != b.num_classes:
        return f"it has {b.num_classes} classes, the main model {a.num_classes}"
    if (a.in_channels, a.input_size) != (b.in_channels, b.input_size):
        return (f"its latents are {b.in_channels}x{b.input_size}x{b.input_size}, the main model's "
                f"{a.in_channels}x{a.input_size}x{a.input_size}")
    if getattr(a, "time_inputs", 1) != getattr(b, "time_inputs", 1):
        return f"it takes {getattr(b, 'time_inputs', 1)} time input(s), the main model {getattr(a, 'time_inputs', 1)}"
    return None


def guide_mismatch(model: torch.nn.Module, objective, autoencoder, guide: torch.nn.Module, guide_objective,
                   guide_autoencoder) -> str | None:
    """Why a guide model cannot autoguide `model`, or None when it can: it must be a model of the
    same data and objective (Karras et al. 2024: a smaller or less trained version of the same
    model), which is what we can check from the files: the objective kind and what the sampler
    walks (the diffusion chain and its prediction; the flow path, prediction and network time),
    the classes, the latent shape (channels, size) and the autoencoder with its latent transform.
    Depth, width, patch size, training length and EMA may differ."""
    kind, guide_kind = objective_kind(objective), objective_kind(guide_objective)
    if kind != guide_kind:
        return f"it was trained with objective={guide_kind}, the main model with objective={kind}"
    if kind == "diffusion":
        if not (np.array_equal(objective.betas, guide_objective.betas)
                and np.array_equal(objective.timestep_map, guide_objective.timestep_map)):
            return (f"its diffusion chain ({guide_objective.num_timesteps} steps) is not the main model's "
                    f"({objective.num_timesteps} steps; the noise schedule must match too)")
        if objective.mean_type != guide_objective.mean_type:
            return f"it predicts {guide_objective.mean_type.value}, the main model {objective.mean_type.value}"
    else:
        ours = (objective.path.name, objective.prediction, objective.network_time)
        theirs = (guide_objective.path.name, guide_objective.prediction, guide_objective.network_time)
        if ours != theirs:
            return (f"its flow objective (path {theirs[0]}, prediction {theirs[1]}, {theirs[2]}) differs from the main "
                    f"model's (path {ours[0]}, prediction {ours[1]}, {ours[2]})")
    mismatch = _shape_mismatch(unwrap_model(model), unwrap_model(guide))
    if mismatch:
        return mismatch
    ae, guide_ae = autoencoder.to_dict(), guide_autoencoder.to_dict()
    if ae != guide_ae:
        return f"it was trained on the autoencoder {guide_ae}, the main model on {ae}"
    return None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Sampling must not drop labels (the label embedder drops them in training mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

