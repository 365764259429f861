"""Drawing samples: a model, a resolved sampler (dit/sampling/samplers.py) and labels in, latents
or uint8 images out, per-sample deterministic.

Determinism is per sample: sample i's initial noise, its per-step noise and its label come from
generators seeded by (global seed, i) alone, and sample i always shares its network batch with
the same samples (block i // batch_size, `dit.sampling.order.sample_blocks`), so a bulk `.npz` is
byte-identical for any number of ranks and across interruptions.

`draw_latents` is the one path to a sampler: it binds the labels and guidance to the network
(`GuidedDenoiser`, with the sampler's guide model for autoguidance), runs `sampler.sample` in
eval mode without autograd, and refuses non-finite results. `sample_latents` / `sample_images`
are the same for callers holding settings and an objective instead of a sampler (they build it
once per call); `generate_samples` draws numbered samples batch by batch for grids, bulk files and
the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.io.images import to_uint8
from dit.sampling.base import Sampler
from dit.sampling.guidance import GuidedDenoiser, eval_mode, unwrap_model
from dit.sampling.order import initial_noise, sample_blocks, sample_generators, sample_labels
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import diffusion_from_config

__all__ = ["NonFiniteSamplesError", "check_finite_samples", "SampleOrder", "draw_latents", "draw_images", "objective_for_model",
           "sample_latents", "sample_images", "generate_samples"]


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN or inf (latents or decoded images): nothing is written from such a
    batch. Callers that know the checkpoint prefix its path to the message."""


def _describe(settings: SamplerSettings) -> str:
    d = settings.to_dict()
    keys = ("sampler", "num_steps", "cfg_scale", "shift") if settings.is_flow else \
        ("sampler", "num_steps", "cfg_scale", "eta")
    method = ("guidance",) if "guidance" in d else ()
    return ", ".join(f"{k}={d[k]}" for k in (*keys, "guided_channels", *method))


def check_finite_samples(x: torch.Tensor, settings: SamplerSettings, what: str = "latents") -> torch.Tensor:
    """`x` (N, ...) if every value is finite, else NonFiniteSamplesError naming the settings and
    the fix. One reduction per batch (not per step)."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteSamplesError(
            f"sampling produced non-finite {what} (NaN/inf) in {int(bad.sum())} of {len(x)} samples with "
            f"{_describe(settings)}: lower cfg_scale/eta, or check the weights (a diverged checkpoint holds NaN); "
            "nothing was written from this batch")
    return x


@dataclass(frozen=True)
class SampleOrder:
    """Which noise, label and network batch each numbered sample gets: noise and labels from
    (seed, index) alone, labels drawn by `label_mode` (uniform | balanced) unless `labels` gives
    one per index, and index blocks of `batch_size` sharing a forward pass."""

    seed: int
    batch_size: int
    label_mode: str = "uniform"
    labels: Sequence[int] | None = None


def draw_latents(model: torch.nn.Module, sampler: Sampler, labels, *, noise: torch.Tensor,
                 generator: torch.Generator | list[torch.Generator] | None = None, progress: bool = False,
                 denoiser_out: list | None = None) -> tuple[torch.Tensor, int]:
    """(x_0 (N, C, H, W), network evaluations per sample) from x_T = `noise` for class `labels`
    (N,), with `sampler` (built by `build_sampler`). Non-finite results raise
    `NonFiniteSamplesError` (checked once, at the end). `generator`: the per-step noise of
    ddpm / ddim(eta>0) / sde, one generator or one per sample (batch-independent results).
    `denoiser_out`: if a list, the `GuidedDenoiser` is appended (to read its counts)."""
    model = unwrap_model(model)
    device = noise.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    cfg = model.config
    expected = (len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must be (N, C, H, W) = {expected} for {len(labels)} labels and this model, "
                         f"got {tuple(noise.shape)}")
    guide = sampler.guide
    denoiser = GuidedDenoiser(model, labels, sampler.settings, network_time=sampler.network_time, guide=guide,
                              objective=sampler.objective)
    if denoiser_out is not None:
        denoiser_out.append(denoiser)
    guide_mode = eval_mode(unwrap_model(guide)) if guide is not None else contextlib.nullcontext()
    with eval_mode(model), guide_mode, torch.no_grad():
        x, nfe = sampler.sample(denoiser, noise, generator=generator, progress=progress)
    return check_finite_samples(x, sampler.settings), nfe  # once per batch, not per step


def draw_images(model: torch.nn.Module, sampler: Sampler, autoencoder, labels, *, noise: torch.Tensor,
                generator=None, progress: bool = False, denoiser_out: list | None = None) -> tuple[np.ndarray, int]:
    """`draw_latents`, decoded by the autoencoder: (uint8 (N, H, W, 3), evaluations per sample).
    Non-finite decoded images raise `NonFiniteSamplesError` (they would become black images)."""
    latents, nfe = draw_latents(model, sampler, labels, noise=noise, generator=generator, progress=progress,
                                denoiser_out=denoiser_out)
    with torch.no_grad():
        return to_uint8(check_finite_samples(autoencoder.decode(latents), sampler.settings, "decoded images")), nfe


def objective_for_model(model: torch.nn.Module, objective):
    """None stands for the release chain (linear, 1000 steps) with the model's learned sigma."""
    return diffusion_from_config(None, unwrap_model(model).config.learn_sigma) if objective is None else objective


def sample_latents(model: torch.nn.Module, objective, labels, settings: SamplerSettings, *, noise: torch.Tensor,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   progress: bool = False, denoiser_out: list | None = None, guide=None) -> torch.Tensor:
    """x_0 (N, C, H, W) from `noise` for `labels`, as `settings` say, for a model trained on
    `objective` (`trained_objective`: the full diffusion chain, or one already respaced to
    `settings.num_steps`; a `FlowMatching`; None: the release chain). `settings.sampler` must fit
    it (`auto` picks the objective's default; the other family raises SamplerMismatchError).
    `clip_denoised` None counts as off (no autoencoder to decide it). `guide`: the guide model of
    guidance=autoguidance. See `draw_latents`."""
    sampler = build_sampler(settings, objective_for_model(model, objective), guide=guide)
    return draw_latents(model, sampler, labels, noise=noise, generator=generator, progress=progress,
                        denoiser_out=denoiser_out)[0]


def sample_images(model: torch.nn.Module, objective, autoencoder, labels, settings: SamplerSettings, *,
                  noise: torch.Tensor, generator=None, progress: bool = False,
                  denoiser_out: list | None = None, guide=None) -> np.ndarray:
    """`sample_latents`, decoded: uint8 (N, H, W, 3), with `clip_denoised` resolved for this
    autoencoder. See `draw_images`."""
    sampler = build_sampler(settings, objective_for_model(model, objective), autoencoder, guide=guide)
    return draw_images(model, sampler, autoencoder, labels, noise=noise, generator=generator, progress=progress,
                       denoiser_out=denoiser_out)[0]


def generate_samples(model, sampler: Sampler, autoencoder, indices: Sequence[int], order: SampleOrder, *,
                     progress: bool = False, collect: bool = True,
                     on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                     stats: dict | None = None):
    """Samples number `indices` of a run ordered by `order`: (images uint8 (n, H, W, 3), labels
    int64 (n,)), in the order of `indices`. Each sample's noise and label depend only on
    (order.seed, index); the network batches are the index blocks of `sample_blocks(indices,
    order.batch_size)`. `on_batch(indices, images, labels)` is called after each batch (bulk
    sampling writes its shards there); `collect=False` keeps nothing in memory and returns empty
    arrays. `stats`, if a dict, receives "nfe": the network evaluations of every batch, summed (a
    flow sampler's count; dopri5's differs per batch)."""
    model = unwrap_model(model)
    cfg = model.config
    device = next(model.parameters()).device
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    all_labels = (sample_labels(order.seed, indices, cfg.num_classes, order.label_mode) if order.labels is None
                  else torch.as_tensor(order.labels, dtype=torch.long).reshape(-1))
    if len(all_labels) != len(indices):
        raise ValueError(f"got {len(all_labels)} labels for {len(indices)} samples")
    label_of = dict(zip(indices.tolist(), all_labels.tolist()))
    blocks = sample_blocks(indices, order.batch_size)
    images, out_labels = {}, {}
    bar = tqdm(total=len(indices), desc=f"sampling ({sampler.describe()})", disable=not progress, unit="img")
    for idx in blocks:
        y = torch.tensor([label_of[int(i)] for i in idx], dtype=torch.long)
        gens = sample_generators(order.seed, idx)
        noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size)).to(device)
        batch, nfe = draw_images(model, sampler, autoencoder, y.to(device), noise=noise, generator=gens,
                                 progress=progress and len(blocks) == 1)  # one batch: show its steps
        if stats is not None:
            stats["nfe"] = stats.get("nfe", 0) + nfe
        if on_batch is not None:
            on_batch(idx, batch, y.numpy())
        if collect:
            for k, i in enumerate(idx.tolist()):
                images[i], out_labels[i] = batch[k], int(y[k])
        bar.update(len(idx))
    bar.close()
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
    wanted = indices.tolist()
    return np.stack([images[i] for i in wanted]), np.array([out_labels[i] for i in wanted], dtype=np.int64)
