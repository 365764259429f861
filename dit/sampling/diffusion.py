"""The diffusion samplers behind the one interface (dit/sampling/base.py): DDPM (ancestral), DDIM
(eta 0 deterministic, up to 1 DDPM-like) on the training chain respaced to `num_steps` (which
timesteps: `SamplerSettings.spacing`, `respaced_timesteps`), and multistep DPM-Solver++(2M)
through diffusers on the training chain's betas.

Time: the denoiser receives original DDPM timesteps (t in 0..T-1, T-1 = noise; contract 5 in
docs/design.md), whatever the respacing. The step arithmetic (posterior means, variances, x0
clipping) is the objective's own (`dit.diffusion.GaussianDiffusion.p_sample` / `ddim_sample`),
so training and sampling share one implementation of the chain.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from dit.diffusion import GaussianDiffusion, MeanType, space_timesteps
from dit.sampling.base import Sampler, register_sampler
from dit.sampling.settings import DEFAULT_SPACING, SPACINGS

__all__ = ["DDPMSampler", "DDIMSampler", "DPMSolverSampler", "respaced_timesteps", "sampling_chain", "dpm_solver"]


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = DEFAULT_SPACING) -> list[int]:
    """The timesteps (ascending) of a chain of `num_timesteps` that a respaced sampler of `num_steps`
    visits. "linspace": evenly spaced, both ends ("250" of 1000 -> {0, 4, ..., 995, 999}; 10 ->
    {0, 111, ..., 999}). "ddim": DiT's "ddimN", the integer stride s with
    len(range(0, T, s)) == num_steps (10 of 1000 -> {0, 100, ..., 900}); ValueError naming the
    nearest step counts that exist when no stride gives exactly `num_steps`."""
    if spacing == "linspace":
        return space_timesteps(num_timesteps, str(num_steps))
    if spacing != "ddim":
        raise ValueError(f"unknown spacing {spacing!r}: use one of {SPACINGS}")
    counts = {len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)}
    if num_steps not in counts:
        near = [c for c in (min((c for c in counts if c > num_steps), default=None),
                            max((c for c in counts if c < num_steps), default=None)) if c is not None]
        raise ValueError(f"spacing=ddim (DiT's ddimN: an integer stride s with num_steps = len(range(0, {num_timesteps}, "
                         f"s))) cannot take num_steps={num_steps} of the {num_timesteps} training timesteps: use "
                         f"num_steps={' or '.join(map(str, near))}, or spacing=linspace (any num_steps, both ends)")
    return space_timesteps(num_timesteps, f"ddim{num_steps}")


def sampling_chain(diffusion: GaussianDiffusion, num_steps: int, spacing: str = DEFAULT_SPACING) -> GaussianDiffusion:
    """The chain a DDPM/DDIM sampler walks: `diffusion` itself when it already has `num_steps`
    steps, otherwise the full chain respaced to the `num_steps` timesteps `respaced_timesteps`
    picks (`spacing` linspace, the default: evenly spaced, both ends, DiT's sampler; ddim: DiT's
    "ddimN" stride). Each step goes to the next visited timestep."""
    if diffusion.num_timesteps == num_steps:
        return diffusion
    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError(f"the diffusion passed is already respaced to {diffusion.num_timesteps} steps, not {num_steps}: "
                         "pass the full chain (create_diffusion('')) or one respaced to num_steps")
    if num_steps > diffusion.original_num_steps:
        raise ValueError(f"num_steps={num_steps} is more than the {diffusion.original_num_steps} steps this model was "
                         f"trained with: use num_steps <= {diffusion.original_num_steps}")
    use = respaced_timesteps(diffusion.original_num_steps, num_steps, spacing)
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


class _ChainSampler(Sampler):
    """DDPM and DDIM: the training chain respaced once (at construction) to `num_steps` steps, at
    the timesteps `settings.spacing` picks."""

    family = "diffusion"

    def __init__(self, settings, objective: GaussianDiffusion):
        super().__init__(settings, objective)
        self.chain = sampling_chain(objective, int(settings.num_steps), spacing=settings.spacing)
        self.clip = bool(settings.clip_denoised)  # None (no autoencoder to decide) counts as off

    def sample(self, denoiser, noise, *, generator=None, progress=False):
        x = self._loop(denoiser, noise, generator, progress)
        return x, self.chain.num_timesteps  # one network evaluation per step


@register_sampler
class DDPMSampler(_ChainSampler):
    """Ancestral sampling with the learned (or fixed) variance: DiT's sampler (250 steps)."""

    name = "ddpm"

    def _loop(self, denoiser, noise, generator, progress):
        return self.chain.p_sample_loop(denoiser, noise.shape, noise=noise, clip_denoised=self.clip,
                                        progress=progress, generator=generator)


@register_sampler
class DDIMSampler(_ChainSampler):
    """DDIM (Song et al. 2021) over the same timesteps; `eta` scales the per-step noise."""

    name = "ddim"

    def _loop(self, denoiser, noise, generator, progress):
        return self.chain.ddim_sample_loop(denoiser, noise.shape, noise=noise, clip_denoised=self.clip,
                                           progress=progress, eta=self.settings.eta, generator=generator)


@register_sampler
class DPMSolverSampler(Sampler):
    """Multistep DPM-Solver++(2M) on the full training chain (`dpm_solver`)."""

    name = "dpm++"
    family = "diffusion"

    def sample(self, denoiser, noise, *, generator=None, progress=False):
        steps = int(self.settings.num_steps)
        x = dpm_solver(denoiser, self.objective, noise, steps, clip_denoised=bool(self.settings.clip_denoised),
                       progress=progress)
        return x, steps  # the deterministic solver ignores `generator`
