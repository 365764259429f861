"""What a sampler walks: the objective the model was trained with (read from the checkpoint's
config): a Gaussian diffusion chain, respaced to the sampler's number of steps (DDPM / DDIM, and
DPM-Solver++ on its betas), or a flow objective (`dit.flow.FlowMatching`) integrated by the flow
samplers (`flow_sample`: Euler / Heun / dopri5 ODE, Euler-Maruyama SDE).

A run trained with `diffusion.noise_schedule=cosine` or `diffusion.diffusion_steps=500` must be
sampled on that chain: its network has only seen the noise levels of that schedule, at timesteps
0..diffusion_steps-1. Our checkpoints record the training config (contract 2 in
docs/design.md); release files record none: DiT's were trained on the linear 1000-step chain,
SiT's on the linear flow path with t = 1 at the data end (`RELEASE_OBJECTIVES`; which release a
file is comes from its name, `dit.io.release.release_family`).

A flow objective is recorded as `config.objective` (`dit.flow.config`); its absence, or kind
"diffusion", means the diffusion chain of `config.diffusion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from tqdm.auto import tqdm

from dit.diffusion import GaussianDiffusion, MeanType, create_diffusion, space_timesteps
from dit.flow import FlowMatching
from dit.sampling.flow import sample_ode, sample_sde
from dit.flow.config import flow_from_config, is_flow
from dit.sampling.settings import SamplerSettings

# What a file without a training config (a release file) was trained on: DiT's chain, which is
# also the training schema's default (dit/config/schema.py, DiffusionConfig).
RELEASE_CHAIN = {"noise_schedule": "linear", "diffusion_steps": 1000}
# The objective of each release family, as `config.objective` records ours (None: diffusion,
# RELEASE_CHAIN). SiT (willisma/SiT): linear path, velocity prediction, t in [0, 1] fed to DiT's
# embedder as is, but t = 1 is data there: the network receives 1 - t and predicts x0 - eps.
RELEASE_OBJECTIVES = {
    "dit": None,
    "sit": {"kind": "flow", "path": "linear", "prediction": "velocity", "network_time_scale": 1.0,
            "network_time_data_at_one": True},
}


def objective_from_config(config: Mapping | None) -> dict | None:
    """The flow objective record (`config.objective`) of a training config or of the provenance
    recorded next to samples, or None for a diffusion model (no `objective` node, or kind
    "diffusion"): what decides which sampler family fits a checkpoint."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"a training config must be a mapping (a checkpoint's `config`), got {type(config).__name__}")
    objective = (config or {}).get("objective")
    return dict(objective) if is_flow(objective) else None


def trained_objective(config: Mapping | None, learn_sigma: bool) -> GaussianDiffusion | FlowMatching:
    """What the model was trained on, ready to sample: the `FlowMatching` of a flow objective
    record, else the full diffusion chain (`diffusion_from_config`)."""
    objective = objective_from_config(config)
    if objective is None:
        return diffusion_from_config(config, learn_sigma)
    try:
        return flow_from_config(objective)
    except ValueError as err:
        raise ValueError(f"the checkpoint's config records objective={objective}, which this code cannot build: "
                         f"{err}") from None


def objective_kind(objective) -> str:
    """"flow" for a FlowMatching, "diffusion" for a GaussianDiffusion or None (the release chain)."""
    return "flow" if isinstance(objective, FlowMatching) else "diffusion"


def trained_chain(config: Mapping | None) -> dict:
    """{"noise_schedule", "diffusion_steps"} of the chain a model was trained on, from any mapping
    with a `diffusion` node (a checkpoint's training config, or the settings recorded next to
    samples); None, or a config without that node: the release chain (linear, 1000 steps)."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"a training config must be a mapping (a checkpoint's `config`), got {type(config).__name__}")
    node = (config or {}).get("diffusion") or {}
    chain = {key: node.get(key, default) for key, default in RELEASE_CHAIN.items()}
    steps = chain["diffusion_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the checkpoint's config says diffusion.diffusion_steps={steps!r}: it must be an integer >= 2")
    return chain


def diffusion_from_config(config: Mapping | None, learn_sigma: bool) -> GaussianDiffusion:
    """The full (not respaced) chain the model was trained on (`trained_chain(config)`), with the
    learned variance when the model predicts it. A release file's None gives DiT's linear
    1000-step chain."""
    chain = trained_chain(config)
    try:
        return create_diffusion("", noise_schedule=chain["noise_schedule"], learn_sigma=learn_sigma,
                                diffusion_steps=chain["diffusion_steps"])
    except ValueError as err:
        raise ValueError(f"the checkpoint's config says diffusion.noise_schedule={chain['noise_schedule']!r}, which "
                         f"this code cannot build: {err}") from None


def sampling_chain(diffusion: GaussianDiffusion, num_steps: int) -> GaussianDiffusion:
    """The chain a DDPM/DDIM sampler walks: `diffusion` itself when it already has `num_steps`
    steps, otherwise the full chain respaced to `num_steps` evenly spaced timesteps including
    both ends ("250" of 1000 -> {0, 4, ..., 995, 999}: DiT's sampler; of 500 -> {0, 2, ..., 499})."""
    if diffusion.num_timesteps == num_steps:
        return diffusion
    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError(f"the diffusion passed is already respaced to {diffusion.num_timesteps} steps, not {num_steps}: "
                         "pass the full chain (create_diffusion('')) or one respaced to num_steps")
    if num_steps > diffusion.original_num_steps:
        raise ValueError(f"num_steps={num_steps} is more than the {diffusion.original_num_steps} steps this model was "
                         f"trained with: use num_steps <= {diffusion.original_num_steps}")
    use = space_timesteps(diffusion.original_num_steps, str(num_steps))
    return GaussianDiffusion(diffusion.betas, use_timesteps=use, mean_type=diffusion.mean_type,
                             var_type=diffusion.var_type, loss_type=diffusion.loss_type)


def dpm_solver(denoiser: Callable, diffusion: GaussianDiffusion, noise: torch.Tensor, num_steps: int, *,
               clip_denoised: bool = False, progress: bool = False) -> torch.Tensor:
    """Multistep DPM-Solver++(2M) (Lu et al. 2022) through diffusers, on `diffusion`'s betas (the
    training chain, whatever its schedule and length). `denoiser(x, t)` returns the network output.

    Learned sigma: only the first C (epsilon) channels are handed to the solver. We do not use
    diffusers' `variance_type="learned_range"`, which keeps a hard-coded 3 channels and would
    drop the 4th latent channel of a KL-f8 model.

    `clip_denoised` clamps the solver's x0 prediction to [-1, 1] at every step, as the DDPM/DDIM
    chains do: diffusers' dynamic thresholding with `sample_max_value=1.0` clamps its per-sample
    threshold s to exactly 1, i.e. x0 -> clamp(x0, -1, 1) / 1 (its own docs call that standard
    clipping), applied where DPM-Solver++ forms x0 from epsilon.
    """
    from diffusers import DPMSolverMultistepScheduler

    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError("dpm++ needs the full (not respaced) diffusion chain: pass the training chain or None")
    if diffusion.mean_type != MeanType.EPSILON:
        raise ValueError("dpm++ is wired for epsilon-prediction models (DiT)")
    if num_steps > diffusion.num_timesteps:
        raise ValueError(f"num_steps={num_steps} is more than the {diffusion.num_timesteps} steps this model was "
                         f"trained with: use num_steps <= {diffusion.num_timesteps}")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="epsilon", lower_order_final=True,
        thresholding=clip_denoised, sample_max_value=1.0)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in tqdm(scheduler.timesteps, desc="dpm++", disable=not progress, leave=False):
        t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        eps = denoiser(x, t_batch)[:, :channels]
        x = scheduler.step(eps, t, x).prev_sample
    return x


def flow_sample(denoiser: Callable, flow: FlowMatching, noise: torch.Tensor, settings: SamplerSettings, *,
                generator=None) -> tuple[torch.Tensor, int]:
    """(x at t = 0, network evaluations) from `noise` at t = 1 with the flow sampler that
    `settings.sampler` names (euler | heun | dopri5: ODE; sde: Euler-Maruyama), integrating the
    velocity of `flow` (its path, prediction and network time) around `denoiser(x, t_net)`, the
    network or its guidance wrapper. `generator`: the SDE's per-step noise (one generator, or one
    per sample, as the diffusion samplers take it)."""
    velocity = flow.velocity(denoiser)
    method = settings.sampler
    if method == "sde":
        out = sample_sde(velocity, noise, path=flow.path, num_steps=int(settings.num_steps),
                         diffusion_form=settings.diffusion_form, diffusion_norm=float(settings.diffusion_norm),
                         last_step=settings.last_step, last_step_size=float(settings.last_step_size),
                         shift=float(settings.shift), generator=generator)
    elif method == "dopri5":
        out = sample_ode(velocity, noise, num_steps=int(settings.num_steps), method="dopri5",
                         rtol=float(settings.rtol), atol=float(settings.atol))
    elif method in ("euler", "heun"):
        out = sample_ode(velocity, noise, num_steps=int(settings.num_steps), method=method, shift=float(settings.shift))
    else:
        raise ValueError(f"{method!r} is not a flow sampler: use euler, heun, sde or dopri5")
    return out.x, out.nfe
