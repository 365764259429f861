"""`SamplerSettings`: how samples are drawn, the one type every consumer takes (sample.py,
eval_fid.py, training grids, the evaluator, output names, the results table). Plain data and its
checks: this module loads no sampler (the config schema imports it); `dit.sampling.samplers.
build_sampler` turns settings, checked once, into the sampler that runs them.

Three families of samplers share it: the diffusion samplers (ddpm, ddim, dpm++) walk a Gaussian
diffusion chain in DDPM time (t in 0..999, 999 noise); the flow samplers (euler, heun, sde,
dopri5; dit/sampling/flow.py) integrate a flow model in continuous time t in [0, 1], t = 1 noise;
the MeanFlow sampler (meanflow; dit/sampling/meanflow.py) jumps with a MeanFlow model's average
velocity in the same time. Which samplers fit a checkpoint is decided by what it was trained with
(`dit.sampling.trained`): diffusion samplers for diffusion models, flow samplers for flow models,
and for MeanFlow models (objective=meanflow) the meanflow sampler and the flow samplers (on its
instantaneous velocity u(z, t, t)). The default sampler, `auto`, becomes that objective's default
(`DEFAULT_SAMPLERS`: DDPM for diffusion models, SiT's SDE for flow models, one MeanFlow step for
MeanFlow models), and a sampler that does not fit is refused (`SamplerMismatchError`) before any work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from dit.sampling.base import registered_samplers
from dit.sampling.precision import check_precision

__all__ = ["AUTO", "DIFFUSION_SAMPLERS", "FLOW_SAMPLERS", "MEANFLOW_SAMPLERS", "SAMPLERS", "DEFAULT_SAMPLERS",
           "MEANFLOW_AUTO_STEPS", "FLOW_FIELDS", "DIFFUSION_FORMS", "LAST_STEPS", "SPACINGS", "DEFAULT_SPACING",
           "SPACED_SAMPLERS", "SamplerMismatchError", "SamplerSettings", "SETTINGS_FIELDS", "samplers_of", "sampler_family",
           "FLOW_GRID_SAMPLER", "GUIDANCE_METHODS", "DEFAULT_GUIDANCE", "APG_FIELDS", "GUIDANCE_METHOD_FIELDS"]

AUTO = "auto"  # the trained objective's default sampler
DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm++")
FLOW_SAMPLERS = ("euler", "heun", "sde", "dopri5")
MEANFLOW_SAMPLERS = ("meanflow",)
# the built-in ones (each has a conf/sampler/*.yaml)
SAMPLERS = (AUTO,) + DIFFUSION_SAMPLERS + FLOW_SAMPLERS + MEANFLOW_SAMPLERS
# The SDE sampler's choices (SiT's): its diffusion coefficient D(t) and its noiseless last step.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "mean", "tweedie", "euler")
# What `auto` becomes, by the objective the checkpoint was trained with. Diffusion: DiT's FID
# protocol (DDPM-250). Flow: SiT's FID protocol (Euler-Maruyama SDE, 250 steps, diffusion form
# "sigma", "mean" last step at 0.04: the sampler behind SiT-XL/2's FID 2.06), which also spends
# the same 250 network evaluations per sample as DDPM-250. MeanFlow: its own sampler, with
# MEANFLOW_AUTO_STEPS steps when num_steps is left at the schema's 250 (see `for_objective`).
DEFAULT_SAMPLERS = {"diffusion": "ddpm", "flow": "sde", "meanflow": "meanflow"}
# MeanFlow's 1-NFE protocol (the paper's headline numbers; the official sampling.num_steps = 1)
MEANFLOW_AUTO_STEPS = 1
# A training run's sample grids (`log.samples`) share their keys with diffusion runs, whose grid
# default is DDPM: on a flow run, `auto` or a diffusion sampler there becomes this ODE (deterministic,
# cheap at the grid's step count) rather than stopping the run.
FLOW_GRID_SAMPLER = "heun"
# Fields that only the flow samplers read; recorded only for them, so a diffusion sampler's
# settings record (and a diffusion bulk file's resume check) is what it was before flow existed.
FLOW_FIELDS = ("shift", "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "rtol", "atol")
# Which timesteps of the training chain (T steps) the respaced ddpm and ddim samplers visit, for
# N = num_steps (dit.sampling.diffusion.respaced_timesteps). "linspace" (the default): N evenly
# spaced, both ends (T = 1000, N = 10: 999, 888, ..., 111, 0), DiT's "250" respacing.
# "ddim": DiT's "ddimN" respacing, the integer stride s with len(range(0, T, s)) == N (N = 10:
# 900, 800, ..., 0), which is what the exported diffusers DDIMScheduler visits when N divides T.
# Recorded only when not the default, so every record and output name from before stays as it was.
SPACINGS = ("linspace", "ddim")
DEFAULT_SPACING = "linspace"
SPACED_SAMPLERS = ("ddpm", "ddim")  # the samplers that read `spacing`
# How the guided prediction is formed at a guided step (dit/sampling/guidance.py; docs/sampling.md,
# "Guidance methods"): cfg, classifier-free guidance (the conditional and the null-class outputs);
# autoguidance (Karras et al. 2024: the model and a weaker guide model of the same task, both
# conditional; needs a guide model, sample.py's guide_checkpoint=); apg, adaptive projected guidance
# (Sadat et al. 2024: CFG's difference in the denoised x0 space, with reverse momentum, a norm
# clamp and its part parallel to the conditional x0 scaled by apg_eta). The method and APG's knobs
# are recorded only when not the default (cfg), so every record from before stays as it was.
GUIDANCE_METHODS = ("cfg", "autoguidance", "apg")
DEFAULT_GUIDANCE = "cfg"
APG_FIELDS = ("apg_eta", "apg_norm_threshold", "apg_momentum")
GUIDANCE_METHOD_FIELDS = ("guidance", *APG_FIELDS)


def _family_samplers(family: str) -> tuple[str, ...]:
    """The samplers of one family: the built-in ones, then any registered by a plugin
    (`dit.sampling.base.register_sampler`)."""
    builtin = {"diffusion": DIFFUSION_SAMPLERS, "flow": FLOW_SAMPLERS, "meanflow": MEANFLOW_SAMPLERS}[family]
    return builtin + tuple(n for n in registered_samplers(family) if n not in builtin)


def samplers_of(kind: str) -> tuple[str, ...]:
    """The samplers that fit a model trained with objective `kind`: those of its family; for a
    MeanFlow model also the flow samplers (they integrate its instantaneous velocity u(z, t, t))."""
    if kind == "meanflow":
        return _family_samplers("meanflow") + _family_samplers("flow")
    return _family_samplers(kind)


def sampler_family(name: str) -> str | None:
    """"diffusion", "flow" or "meanflow": the family of the sampler `name` (None for auto or an
    unknown name)."""
    return next((f for f in ("diffusion", "flow", "meanflow") if name in _family_samplers(f)), None)


class SamplerMismatchError(ValueError):
    """A sampler of one family asked of a model trained with the other objective (a DDPM sampler
    for a flow model, or the reverse). Entry points turn it into a one-line ConfigError."""


@dataclass
class SamplerSettings:
    """Everything that decides how samples are drawn from a model, with the defaults of the
    paper's FID protocol (DDPM-250, guidance 1.5 on 3 channels; for a flow model `auto` picks
    SiT's SDE-250). One type for sample.py, eval_fid.py, training grids, the evaluator, output
    names and the results table: a new sampler knob is a field here and its use in the sampler
    (and, to set it from the command line, `sampler.<field>` in conf/sampler/; the schema picks
    it up from this class).

    `sampler`: auto (the objective's default, `DEFAULT_SAMPLERS`), a diffusion sampler or a flow
    sampler; `for_objective` turns auto into a real one and refuses the wrong family.
    `guided_channels`: "3" (the paper's evaluation) or "all"; ints are accepted from Python.
    `guidance_interval`: [lo, hi]; guidance only for lo <= t <= hi, the conditional model alone
    elsewhere (Kynkäänniemi et al. 2024). None: every step. Diffusion samplers: original DDPM
    timesteps (integers, 999 = noise). Flow samplers: our continuous time t in [0, 1] (t = 1
    noise, dit/flow), the time the sampler is at when it calls the network (REPA's
    `guidance_low/high` as they are, e.g. [0, 0.7]).
    `clip_denoised`: clamp each step's predicted x0 to [-1, 1] before the posterior mean (ADM's
    pixel models do). None: automatic, on for the pixel autoencoder, off for latent VAEs
    (`resolved(autoencoder)` decides; sample_latents alone, with no autoencoder, treats it as off).
    Diffusion samplers only: a flow sampler leaves it None.
    `precision`: the network forward in fp32 (IEEE: TF32 forced off), tf32, or bf16 (autocast on
    the forward only; the chain's arithmetic stays float32). See dit/sampling/precision.py.
    `spacing` (ddpm and ddim only, `SPACINGS`): which timesteps the respaced chain visits:
    linspace (N evenly spaced, both ends: 999, ..., 0) or ddim (DiT's "ddimN" stride: N = 10 visits
    900, 800, ..., 0, as the exported diffusers pipeline does when N divides T).

    `guidance` (`GUIDANCE_METHODS`): how a guided step mixes, at scale w = `cfg_scale`: cfg
    (classifier-free), autoguidance (D_guide + w (D - D_guide), the guide a weaker model of the same
    task given to the sampler, `build_sampler(..., guide=)`) or apg (adaptive projected guidance:
    D_cond + (w - 1)(dD_perp + apg_eta dD_par) in x0 space, dD = D_cond - D_uncond after reverse
    momentum `apg_momentum` (beta, in (-1, 1); 0: none) and the norm clamp `apg_norm_threshold` (r;
    null: none)). `apg_eta` 1 with no clamp and no momentum is CFG. The scale, guided channels and
    interval apply to all three. See docs/sampling.md, "Guidance methods".

    Flow samplers only (docs/flow.md): `shift` (SD3 / LightningDiT timestep shift of the grid,
    1 = none; > 1 spends more steps near noise), the SDE's `diffusion_form`, `diffusion_norm`,
    `last_step` (mean | euler | tweedie | null) and `last_step_size` (SiT's defaults: sigma, 1,
    mean, 0.04), and dopri5's `rtol` / `atol` (SiT's 1e-3 / 1e-6).
    """

    # auto | ddpm | ddim | dpm++ (diffusion models) | euler | heun | sde | dopri5 (flow and MeanFlow models)
    # | meanflow (MeanFlow models)
    sampler: str = AUTO
    num_steps: int = 250
    cfg_scale: float = 1.5  # 1: no guidance (and no null pass)
    guided_channels: str = "3"
    guidance_interval: Optional[list[float]] = None
    guidance: str = DEFAULT_GUIDANCE  # cfg | autoguidance (needs a guide model) | apg
    apg_eta: float = 0.0  # apg: weight of the update's part parallel to the conditional x0 (0: the paper's; 1: kept)
    apg_norm_threshold: Optional[float] = None  # apg: clamp the x0 difference's norm per sample to r (null: no clamp)
    apg_momentum: float = 0.0  # apg: beta of the running x0 difference (< 0: the paper's reverse momentum; 0: none)
    eta: float = 0.0  # DDIM's noise: 0 deterministic, 1 DDPM-like (at most 1)
    spacing: str = DEFAULT_SPACING  # ddpm/ddim timesteps: linspace (999, ..., 0) | ddim (DiT's ddimN stride)
    clip_denoised: Optional[bool] = None  # None: on for vae=pixel, off for latent VAEs
    precision: str = "fp32"  # fp32 | tf32 | bf16: the network forward's arithmetic
    shift: float = 1.0  # flow: timestep shift of the grid (1 = none)
    diffusion_form: str = "sigma"  # sde: SiT's diffusion coefficient D(t)
    diffusion_norm: float = 1.0  # sde: D's magnitude
    last_step: Optional[str] = "mean"  # sde: the noiseless last step (mean | euler | tweedie | null)
    last_step_size: float = 0.04  # sde: where the noisy steps stop
    rtol: float = 1e-3  # dopri5
    atol: float = 1e-6  # dopri5

    @property
    def is_flow(self) -> bool:
        """Whether this sampler runs in flow time (a flow sampler, or the meanflow sampler: they
        need a flow or MeanFlow model) rather than in DDPM time."""
        return sampler_family(self.sampler) in ("flow", "meanflow")

    def for_objective(self, kind: str) -> "SamplerSettings":
        """These settings for a model trained with objective `kind` ("diffusion" | "flow" |
        "meanflow"): `auto` becomes the objective's default sampler (for MeanFlow, the meanflow
        sampler with MEANFLOW_AUTO_STEPS = 1 step when num_steps is the schema's 250, DDPM's and
        the SDE's count, else num_steps steps); a sampler that does not fit raises
        SamplerMismatchError naming the samplers that fit. Returns self when nothing changes."""
        if kind not in DEFAULT_SAMPLERS:
            raise ValueError(f"unknown objective kind {kind!r}: expected one of {tuple(DEFAULT_SAMPLERS)}")
        if self.sampler == AUTO:
            steps = self.num_steps
            if kind == "meanflow" and int(steps) == SamplerSettings.num_steps:
                steps = MEANFLOW_AUTO_STEPS
            return dataclasses.replace(self, sampler=DEFAULT_SAMPLERS[kind], num_steps=steps)
        fits = samplers_of(kind)
        if self.sampler not in fits:
            family = sampler_family(self.sampler) or "diffusion"  # an unknown name: as before (check() names it)
            needs = " (it needs a model trained with objective=meanflow)" if family == "meanflow" else ""
            raise SamplerMismatchError(
                f"unknown sampler {self.sampler!r} for a model trained with objective={kind}: {self.sampler} is a "
                f"{family} sampler{needs}; use sampler={'|'.join(fits)} (or sampler=auto: {DEFAULT_SAMPLERS[kind]})")
        return self

    def check(self) -> "SamplerSettings":
        """Raise ValueError naming the field whose value cannot work; returns self. (Whether
        `guided_channels` fits a model's channels is checked against the model when sampling.)"""
        known = (AUTO,) + samplers_of("diffusion") + samplers_of("meanflow")
        if self.sampler not in known:
            raise ValueError(f"unknown sampler {self.sampler!r}: use one of {known}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.sampler in ("ddpm", "ddim", "sde") and int(self.num_steps) < 2:
            # A respaced chain needs both ends (t = 999 and t = 0); one step has no posterior to walk.
            # The SDE's grid needs its first point and the last step's.
            raise ValueError(f"the {self.sampler} sampler needs num_steps >= 2 (a chain from noise to data), "
                             f"got {self.num_steps}")
        # eta > 1 asks for more noise than the step's variance holds: DDIM's sqrt(1 - a - sigma^2)
        # becomes NaN. Non-finite values would turn every sample into NaN, then into black images.
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        guided = self.guided_channels_value
        if guided != "all" and not (type(guided) is int and guided > 0):
            raise ValueError(f"guided_channels must be a channel count or 'all' (3 reproduces the paper), "
                             f"got {self.guided_channels!r}")
        if self.guidance_interval is not None:
            self._check_interval()
        if self.clip_denoised not in (None, True, False):
            raise ValueError(f"clip_denoised must be true, false or null (automatic: on for vae=pixel), "
                             f"got {self.clip_denoised!r}")
        check_precision(self.precision)
        self._check_guidance_method()
        self._check_spacing()
        self._check_flow_fields()
        return self

    def _check_guidance_method(self) -> None:
        if self.guidance not in GUIDANCE_METHODS:
            raise ValueError(f"unknown guidance {self.guidance!r}: use cfg (classifier-free), autoguidance (with "
                             "guide_checkpoint=, a weaker model of the same task) or apg (adaptive projected guidance)")
        eta, r, beta = self.apg_eta, self.apg_norm_threshold, self.apg_momentum
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"apg_eta must be in [0, 1] (0: drop the update's part parallel to the conditional x0, "
                             f"the paper's choice; 1: keep it), got {eta}")
        if r is not None and not (isinstance(r, (int, float)) and r > 0):
            raise ValueError(f"apg_norm_threshold must be > 0 (the largest norm of the x0 difference per sample) or "
                             f"null (no clamp), got {r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and -1 < beta < 1):
            raise ValueError(f"apg_momentum must be in (-1, 1) (< 0: the paper's reverse momentum; 0: none), "
                             f"got {beta}")
        if self.guidance != "apg":
            changed = [f"{k}={getattr(self, k)}" for k in APG_FIELDS
                       if getattr(self, k) != getattr(SamplerSettings, k)]
            if changed:
                raise ValueError(f"{', '.join(changed)} set with guidance={self.guidance}: these are APG's knobs (set "
                                 "guidance=apg, or leave them out)")

    @property
    def apg_clamp(self) -> float | None:
        """APG's norm threshold r as a number, or None for no clamp (null or inf)."""
        r = self.apg_norm_threshold
        return None if r is None or math.isinf(float(r)) else float(r)

    def _check_spacing(self) -> None:
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}: use linspace (num_steps evenly spaced timesteps, both "
                             "ends: 999, ..., 0; the default) or ddim (DiT's ddimN: the integer stride s with "
                             "num_steps = len(range(0, T, s)), e.g. 900, 800, ..., 0 for 10 steps)")
        if self.spacing != DEFAULT_SPACING and self.sampler not in (AUTO, *SPACED_SAMPLERS):
            raise ValueError(f"spacing={self.spacing} chooses the timesteps of the respaced ddpm and ddim chains: "
                             f"the {self.sampler} sampler has none (use spacing={DEFAULT_SPACING}, or "
                             f"sampler={'|'.join(SPACED_SAMPLERS)})")

    def _check_interval(self) -> None:
        interval = list(self.guidance_interval)
        if len(interval) != 2 or not all(math.isfinite(float(v)) for v in interval):
            raise ValueError(f"guidance_interval must be [lo, hi], got {self.guidance_interval}")
        lo, hi = (float(v) for v in interval)
        if self.is_flow:
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval for the flow sampler {self.sampler} is [lo, hi] in flow time with "
                                 f"0 <= lo <= hi <= 1 (t = 1 is noise), got {self.guidance_interval}")
        elif self.sampler == AUTO:
            if not 0 <= lo <= hi:  # its units follow the objective: checked again once resolved
                raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo <= hi, got {self.guidance_interval}")
        elif lo != int(lo) or hi != int(hi) or not 0 <= int(lo) <= int(hi):
            raise ValueError(f"guidance_interval must be [lo, hi] timesteps with 0 <= lo <= hi, "
                             f"got {self.guidance_interval}")

    def _check_flow_fields(self) -> None:
        if not self.is_flow:
            if self.sampler != AUTO and self.shift != 1:
                raise ValueError(f"shift={self.shift} is a flow sampler's timestep shift: the {self.sampler} sampler "
                                 f"has none (use shift=1, or a flow sampler: {FLOW_SAMPLERS})")
            return
        if self.clip_denoised:
            raise ValueError(f"clip_denoised applies to the diffusion samplers {DIFFUSION_SAMPLERS}: the flow sampler "
                             f"{self.sampler} has no x0 to clip (set clip_denoised=null)")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be > 0 (1 = no shift), got {self.shift}")
        if self.sampler == "dopri5" and self.shift != 1:
            raise ValueError("shift moves a fixed grid: the adaptive dopri5 solver picks its own steps (use shift=1)")
        if self.diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion_form {self.diffusion_form!r}: use one of {DIFFUSION_FORMS}")
        if self.diffusion_form == "SBDM" and self.sampler == "sde":
            raise ValueError("diffusion_form=SBDM is infinite at t = 1 and our SDE starts there: use sigma (SiT's default)")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {self.last_step!r}: use one of {LAST_STEPS}")
        if not (math.isfinite(self.diffusion_norm) and self.diffusion_norm >= 0):
            raise ValueError(f"diffusion_norm must be >= 0, got {self.diffusion_norm}")
        if not 0 <= self.last_step_size < 1 or (self.last_step is not None and self.last_step_size == 0):
            raise ValueError(f"last_step_size must be in (0, 1) (0 only with last_step=null), got {self.last_step_size}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got rtol={self.rtol}, atol={self.atol}")

    @property
    def nfe(self) -> int | None:
        """Network evaluations per sample of a flow-time sampler (a guided one is one pass over
        both halves): euler N, heun 2N (the corrector on every step), sde N - 1 noisy steps plus
        the last step (N - 1 with last_step=null), meanflow N (one per jump); None for dopri5
        (adaptive: counted per batch) and the diffusion samplers (their count is num_steps)."""
        n = int(self.num_steps)
        if self.sampler in ("euler", "meanflow"):
            return n
        if self.sampler == "heun":
            return 2 * n
        if self.sampler == "sde":
            return n if self.last_step is not None else n - 1
        return None

    def resolved(self, autoencoder) -> "SamplerSettings":
        """A copy with `clip_denoised` decided for `autoencoder`: as given, or (None) on for the
        pixel autoencoder (the model works on [-1, 1] images, as ADM's pixel models) and off for a
        latent VAE (latents are not bounded by [-1, 1]). Flow samplers keep None. Resolve `auto`
        first (`for_objective`): auto is treated as its diffusion default here."""
        if self.clip_denoised is not None or self.is_flow:
            return self
        return dataclasses.replace(self, clip_denoised=getattr(autoencoder, "name", None) == "pixel")

    @property
    def guided_channels_value(self) -> int | str:
        """`guided_channels` as settings files record it and the model takes it: 3 or "all"."""
        g = self.guided_channels
        return int(g) if isinstance(g, str) and g.isdigit() else g

    def to_dict(self) -> dict:
        """Every field, as recorded next to samples (plain JSON types; a subclass's extra fields,
        such as a training grid's `every`, are not sampler settings and are left out). The
        flow-only fields and `nfe` are recorded for flow samplers only, so a diffusion record is
        what it was before flow sampling existed; `spacing` only when it is not the default, so a
        record (and a bulk file's resume check) is what it was before spacing was a choice; likewise
        `guidance` only when not cfg, and APG's knobs only with guidance=apg (r: null for no clamp)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)
               if (self.is_flow or f.name not in FLOW_FIELDS)
               and not (f.name == "spacing" and self.spacing == DEFAULT_SPACING)
               and not (f.name == "guidance" and self.guidance == DEFAULT_GUIDANCE)
               and not (f.name in APG_FIELDS and self.guidance != "apg")}
        if self.guidance == "apg":
            out.update(apg_eta=float(self.apg_eta), apg_norm_threshold=self.apg_clamp,
                       apg_momentum=float(self.apg_momentum))
        interval = self.guidance_interval
        if interval is not None:
            interval = [float(v) for v in interval] if self.is_flow else [int(v) for v in interval]
        out.update(num_steps=int(self.num_steps), cfg_scale=float(self.cfg_scale), eta=float(self.eta),
                   guided_channels=self.guided_channels_value, guidance_interval=interval)
        if self.is_flow:
            out.update(shift=float(self.shift), diffusion_norm=float(self.diffusion_norm),
                       last_step_size=float(self.last_step_size), rtol=float(self.rtol), atol=float(self.atol),
                       nfe=self.nfe)
        return out


SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings))
