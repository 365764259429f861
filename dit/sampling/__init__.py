"""Sampling with classifier-free guidance: `SamplerSettings` (the one description of how to
sample, used by every consumer; dit/sampling/settings.py), DDPM, DDIM and DPM-Solver++ for
diffusion models, Euler / Heun / dopri5 ODE and Euler-Maruyama SDE for flow models (dit/flow/),
and per-sample deterministic batches of images. Bulk `.npz` files are `dit/sampling/bulk.py`; per-sample seeds, labels
and network batches are `dit/sampling/order.py`; the chain a sampler walks (the trained one, from a
checkpoint's config) is `dit/sampling/trained.py`; the forward precision is `dit/sampling/precision.py` (all
re-exported here).

Determinism is per sample: sample i's initial noise, its per-step noise and its label come from
generators seeded by (global seed, i) alone, and sample i always shares its network batch with
the same samples (block i // batch_size, see `sample_blocks`), so a bulk `.npz` is
byte-identical for any number of ranks and across interruptions.

Guidance (contract 6 in docs/design.md): the conditional and the unconditional (null class,
`dit.models.null_class`) passes run as one batch through `DiT.forward_with_cfg`; `cfg_scale == 1`
skips the unconditional pass entirely, and so does any step outside the optional guidance
interval.

Which sampler family runs is decided by what the model was trained on (`trained_objective`,
from the checkpoint's config): the `objective` argument of the samplers below is a
GaussianDiffusion (or None: DiT's release chain) or a `dit.flow.FlowMatching`; the default
sampler `auto` becomes that objective's default and a sampler of the other family is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.autoencoder import autoencoder_from_spec, build_autoencoder, warn_partial_guidance
from dit.io.checkpoint import load_dit_checkpoint
from dit.diffusion import GaussianDiffusion
from dit.flow import FlowMatching, NetworkTime
from dit.io.files import to_uint8
from dit.models import null_class, parse_guided_channels
from dit.sampling.precision import PRECISIONS, forward_precision
from dit.io.release import release_family
from dit.sampling.trained import (RELEASE_CHAIN, RELEASE_OBJECTIVES, diffusion_from_config, dpm_solver, flow_sample,
                              objective_from_config, objective_kind, sampling_chain, trained_chain, trained_objective)
from dit.sampling.settings import (AUTO, DEFAULT_SAMPLERS, DIFFUSION_SAMPLERS, FLOW_SAMPLERS, SAMPLERS, SETTINGS_FIELDS,
                                 SamplerMismatchError, SamplerSettings)
from dit.sampling.order import (LABEL_MODES, LABEL_STREAM, NOISE_STREAM, initial_noise, rank_indices, sample_blocks,
                              sample_generators, sample_labels, sample_seed)

__all__ = [  # what dit.sampling.order defines is re-exported: per-sample randomness belongs to sampling
    "LABEL_MODES", "LABEL_STREAM", "NOISE_STREAM", "initial_noise", "rank_indices", "sample_blocks",
    "sample_generators", "sample_labels", "sample_seed",
    "RELEASE_CHAIN", "diffusion_from_config", "sampling_chain", "trained_chain", "PRECISIONS",  # the same for these
    "RELEASE_OBJECTIVES", "objective_from_config", "objective_kind", "trained_objective", "flow_sample",
    "SAMPLERS", "SamplerSettings", "SETTINGS_FIELDS", "AUTO", "DEFAULT_SAMPLERS", "DIFFUSION_SAMPLERS",
    "FLOW_SAMPLERS", "SamplerMismatchError", "NonFiniteSamplesError", "check_finite_samples",
    "unwrap_model", "GuidedDenoiser", "sample_latents", "sample_images", "generate_samples",
    "DEFAULT_RELEASE_VAE", "load_for_sampling", "settings_path_for", "default_output_name",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# How to sample
# --------------------------------------------------------------------------------------


# SamplerSettings (with SAMPLERS, SETTINGS_FIELDS and the flow samplers' knobs) is dit/sampling/settings.py.


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN or inf (latents or decoded images): nothing is written from such a
    batch. Callers that know the checkpoint prefix its path to the message."""


def _describe(settings: SamplerSettings) -> str:
    d = settings.to_dict()
    keys = ("sampler", "num_steps", "cfg_scale", "shift") if settings.is_flow else \
        ("sampler", "num_steps", "cfg_scale", "eta")
    return ", ".join(f"{k}={d[k]}" for k in (*keys, "guided_channels"))


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


# --------------------------------------------------------------------------------------
# The network as the samplers see it
# --------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)  # DDP / FSDP wrappers


class GuidedDenoiser:
    """fn(x (B, C, H, W), t (B,) the network's timestep input) -> the network output (B, C_out,
    H, W) with classifier-free guidance applied as `settings` say. Counts network passes (`calls`)
    and rows (`rows`): a guided step is one pass over 2B rows, an unguided one a pass over B rows.

    `network_time`: None for a diffusion model (t: original DDPM timesteps, compared with the
    guidance interval as integers); a flow model's `NetworkTime`, which maps the network's input
    back to our flow time t in [0, 1] (t = 1 noise), the time its guidance interval is given in."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, settings: SamplerSettings,
                 network_time: NetworkTime | None = None):
        settings.check()
        self.model = model
        self.precision = settings.precision
        num_classes = model.config.num_classes
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{num_classes - 1}")
        self.guided = float(settings.cfg_scale) != 1.0
        if self.guided and model.y_embedder.embedding_table.num_embeddings <= num_classes:
            raise ValueError("cfg_scale != 1 needs the null-class embedding, but this model was built with "
                             "class_dropout_prob=0: sample with cfg_scale=1")
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
        (diffusion), our flow time as a float (flow; the network may see 1 - t or 1000 t)."""
        if self.network_time is None:
            return int(t[0])
        return float(self.network_time.flow_time(t[0].double()))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_unused) -> torch.Tensor:
        self.calls += 1
        # All samples of a batch are at the same step, so one decision serves the batch.
        guided = self.guides_at(self.step_time(t))
        self.rows += (2 if guided else 1) * len(x)
        # bf16 autocasts the network (with forward_with_cfg's guidance mix); the chain gets float32.
        with forward_precision(self.precision, x.device):
            if not guided:
                return self.model(x, t, self.labels).float()
            both = torch.cat([x, x])  # (2B, C, H, W): conditional half, then unconditional half
            out = self.model.forward_with_cfg(both, torch.cat([t, t]), torch.cat([self.labels, self.null]),
                                              self.cfg_scale, self.guided_channels)
        return out[: len(x)].float()  # both halves hold the same guided output


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Sampling must not drop labels (the label embedder drops them in training mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


def sample_latents(model: torch.nn.Module, diffusion: GaussianDiffusion | FlowMatching | None, labels,
                   settings: SamplerSettings, *, noise: torch.Tensor,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   progress: bool = False, denoiser_out: list | None = None) -> torch.Tensor:
    """Draw x_0 (N, C, H, W) from x_T = `noise` for class `labels` (N,), as `settings` say.
    Non-finite results raise `NonFiniteSamplesError` (checked once, at the end).

    Args:
        diffusion: what the model was trained on (`trained_objective`): the full diffusion chain
            (`diffusion_from_config`), or one already respaced to `settings.num_steps`; None: the
            release chain (linear, 1000 steps) with the model's `learn_sigma`; or a
            `FlowMatching` (flow samplers). `settings.sampler` must fit it (`auto` picks the
            objective's default; the other family raises SamplerMismatchError).
            `settings.clip_denoised` None counts as off.
        generator: the per-step noise of ddpm / ddim(eta>0) / sde: one generator, or a list with
            one per sample (batch-independent results).
        denoiser_out: if a list is given, the `GuidedDenoiser` is appended (to read its counts;
            a flow sampler's evaluations per sample are its `calls`).
    """
    settings = settings.for_objective(objective_kind(diffusion)).check()
    model = unwrap_model(model)
    device = noise.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    cfg = model.config
    expected = (len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must be (N, C, H, W) = {expected} for {len(labels)} labels and this model, "
                         f"got {tuple(noise.shape)}")
    if isinstance(diffusion, FlowMatching):
        denoiser = GuidedDenoiser(model, labels, settings, network_time=diffusion.network_time)
        if denoiser_out is not None:
            denoiser_out.append(denoiser)
        with _eval_mode(model), torch.no_grad():
            x, _ = flow_sample(denoiser, diffusion, noise, settings, generator=generator)
        return check_finite_samples(x, settings)
    if diffusion is None:
        diffusion = diffusion_from_config(None, cfg.learn_sigma)
    denoiser = GuidedDenoiser(model, labels, settings)
    if denoiser_out is not None:
        denoiser_out.append(denoiser)
    num_steps, clip = int(settings.num_steps), bool(settings.clip_denoised)
    with _eval_mode(model), torch.no_grad():
        if settings.sampler == "dpm++":
            x = dpm_solver(denoiser, diffusion, noise, num_steps, clip_denoised=clip, progress=progress)
        elif settings.sampler == "ddpm":
            x = sampling_chain(diffusion, num_steps).p_sample_loop(denoiser, noise.shape, noise=noise, clip_denoised=clip,
                                                                   progress=progress, generator=generator)
        else:
            x = sampling_chain(diffusion, num_steps).ddim_sample_loop(denoiser, noise.shape, noise=noise,
                                                                      clip_denoised=clip, progress=progress,
                                                                      eta=settings.eta, generator=generator)
    return check_finite_samples(x, settings)  # once per batch, not per step


def sample_images(model: torch.nn.Module, diffusion: GaussianDiffusion | FlowMatching | None, autoencoder, labels,
                  settings: SamplerSettings, *, noise: torch.Tensor, generator=None, progress: bool = False,
                  denoiser_out: list | None = None) -> np.ndarray:
    """`sample_latents`, decoded by the autoencoder: uint8 (N, H, W, 3), with the sampler chosen
    for the objective and `clip_denoised` resolved for this autoencoder. Non-finite latents or
    decoded images raise `NonFiniteSamplesError` (they would become black images)."""
    settings = settings.for_objective(objective_kind(diffusion)).resolved(autoencoder)
    latents = sample_latents(model, diffusion, labels, settings, noise=noise, generator=generator, progress=progress,
                             denoiser_out=denoiser_out)
    with torch.no_grad():
        return to_uint8(check_finite_samples(autoencoder.decode(latents), settings, "decoded images"))


def generate_samples(model, diffusion, autoencoder, indices: Sequence[int], settings: SamplerSettings, *, seed: int,
                     batch_size: int, label_mode: str = "uniform", labels: Sequence[int] | None = None, device=None,
                     progress: bool = False, collect: bool = True,
                     on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                     stats: dict | None = None):
    """Samples number `indices` of a run seeded `seed`: (images uint8 (n, H, W, 3), labels int64
    (n,)), in the order of `indices`. Each sample's noise and label depend only on (seed, index);
    the network batches are the index blocks of `sample_blocks(indices, batch_size)`. `labels`
    overrides the label draw (one per index). `on_batch(indices, images, labels)` is called after
    each batch (bulk sampling writes its shards there); `collect=False` keeps nothing in memory
    and returns empty arrays. `stats`, if a dict, receives "nfe": the network evaluations of
    every batch, summed (a flow sampler's count; dopri5's differs per batch)."""
    settings = settings.for_objective(objective_kind(diffusion)).check()
    model = unwrap_model(model)
    cfg = model.config
    if device is None:
        device = next(model.parameters()).device
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    all_labels = (sample_labels(seed, indices, cfg.num_classes, label_mode) if labels is None
                  else torch.as_tensor(labels, dtype=torch.long).reshape(-1))
    if len(all_labels) != len(indices):
        raise ValueError(f"got {len(all_labels)} labels for {len(indices)} samples")
    label_of = dict(zip(indices.tolist(), all_labels.tolist()))
    blocks = sample_blocks(indices, batch_size)
    images, out_labels = {}, {}
    bar = tqdm(total=len(indices), desc=f"sampling ({settings.sampler}, {settings.num_steps} steps)",
               disable=not progress, unit="img")
    for idx in blocks:
        y = torch.tensor([label_of[int(i)] for i in idx], dtype=torch.long)
        gens = sample_generators(seed, idx)
        noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size)).to(device)
        denoisers = []
        batch = sample_images(model, diffusion, autoencoder, y.to(device), settings, noise=noise, generator=gens,
                              progress=progress and len(blocks) == 1, denoiser_out=denoisers)  # one batch: show its steps
        if stats is not None:
            stats["nfe"] = stats.get("nfe", 0) + denoisers[0].calls
        if on_batch is not None:
            on_batch(idx, batch, y.numpy())
        if collect:
            for k, i in enumerate(idx.tolist()):
                images[i], out_labels[i] = batch[k], int(y[k])
        bar.update(len(idx))
    bar.close()
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
    order = indices.tolist()
    return np.stack([images[i] for i in order]), np.array([out_labels[i] for i in order], dtype=np.int64)


# --------------------------------------------------------------------------------------
# Loading and naming for the entry points
# --------------------------------------------------------------------------------------

# The decoder DiT's FID numbers were measured with; used for release files, which record none.
DEFAULT_RELEASE_VAE = "sd-ema"


def _check_finite_weights(model: torch.nn.Module, path: Path, which: str) -> None:
    """A checkpoint of a diverged run holds NaN/inf weights, which would sample black images."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteSamplesError(
                f"checkpoint {path}: its {which} weights hold {count} non-finite value(s) (NaN/inf) in {name}: "
                "it comes from a diverged run; sample from an earlier checkpoint (or which=model if only the EMA "
                "is affected)")


def load_for_sampling(checkpoint: str | os.PathLike, *, which: str = "ema", model_name: str | None = None,
                      vae: str | None = None, vae_scale_factor: float | None = None, device="cpu",
                      num_heads: int | None = None, release_format: str | None = None):
    """(model, autoencoder, provenance) from a checkpoint: the model configuration as stored
    (or inferred from release-file shapes), the autoencoder recorded in the checkpoint unless
    `vae` names another (its latent scale: `vae_scale_factor`, else the checkpoint's for its own
    autoencoder, else the VAE's), and a provenance dict for the settings file, which names what
    the model was trained on: the diffusion chain (`provenance["diffusion"]`, from the checkpoint's
    config; the linear 1000-step chain for DiT's release files), or a flow model's objective
    (`provenance["objective"]`: the checkpoint's `config.objective`, or SiT's for a file named like
    SiT's release). `trained_objective(provenance, learn_sigma)` builds either. `num_heads`: for a
    release-format file of a width outside the official table (heads leave no trace in shapes).
    `release_format`: "dit" | "sit", how a release-format file was trained (None: by its name,
    `dit.io.release.release_family`); our checkpoints record their objective and ignore it."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist: give a training checkpoint "
                                "(<run>/checkpoints/NNNNNNN.pt) or a release file such as DiT-XL-2-256x256.pt")
    extra = {"num_heads": num_heads} if num_heads is not None else {}
    model, meta = load_dit_checkpoint(path, which=which, model_name=model_name, device=device, **extra)
    _check_finite_weights(model, path, which)
    stored = meta.get("autoencoder") or {}
    name = vae or stored.get("name") or DEFAULT_RELEASE_VAE
    if vae_scale_factor is None and stored.get("name") == name:
        autoencoder = autoencoder_from_spec(stored, device=device)  # the recorded latent transform
    else:
        autoencoder = build_autoencoder(name, scale_factor=vae_scale_factor, device=device)
    if autoencoder.latent_channels != model.config.in_channels:
        raise ValueError(f"vae={name} has {autoencoder.latent_channels} latent channels but the model takes "
                         f"{model.config.in_channels}: pass the autoencoder it was trained with (vae=...)")
    if meta.get("format") == "ours" and meta.get("config") is None:
        log.warning("checkpoint %s records no training config: sampling with the linear %d-step chain (if it was "
                    "trained on another, sample from the training checkpoint, which records it)", path,
                    RELEASE_CHAIN["diffusion_steps"])
    provenance = {"checkpoint": str(path.resolve()), "which": which if meta.get("format") == "ours" else "ema",
                  "step": meta.get("step"), "model_name": meta.get("model_name"), "vae": name}
    objective = (objective_from_config(meta.get("config")) if meta.get("format") == "ours"
                 else RELEASE_OBJECTIVES[release_family(path, release_format)])
    if objective is None:
        provenance["diffusion"] = trained_chain(meta.get("config"))
    else:  # a flow model: its objective, as trained_objective(provenance, ...) rebuilds it
        provenance["objective"] = objective
    return model, autoencoder, provenance


def settings_path_for(out_path: str | os.PathLike) -> Path:
    """Where the sampling settings of an output file live, next to it: `X.json` for a bulk
    `X.npz` (what eval_fid.py reads), `X.png.json` for a grid `X.png` (any other file: its full
    name + `.json`), so a grid and a bulk file of one stem never share a settings file."""
    out_path = Path(out_path)
    return out_path.with_suffix(".json") if out_path.suffix == ".npz" else out_path.with_name(out_path.name + ".json")


def default_output_name(provenance: dict, settings: SamplerSettings, *, seed: int,
                        num_samples: int | None = None) -> str:
    """A file stem that states the protocol, e.g. `DiT-XL-2-256x256-ema-ddpm250-cfg1.5-g3-seed0-n50000`.
    A checkpoint of a run directory (`<run>/checkpoints/0002000.pt`) is named with its run
    (`<run>-0002000-...`), so two runs' samples of the same step never share a default file."""
    checkpoint = Path(provenance["checkpoint"])
    stem = checkpoint.stem
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name:
        run = checkpoint.parent.parent.name
        if len(run) > 64:  # a sweep job's directory (its overrides): short, still unique
            run = run[:48] + "-" + hashlib.sha256(run.encode()).hexdigest()[:8]
        stem = f"{run}-{stem}"
    step = provenance.get("step")
    parts = [stem, provenance.get("which", "ema")]
    if step is not None and str(step) not in stem:
        parts.append(f"step{step}")
    # dopri5 picks its own steps: its tolerance names it instead of the unused num_steps
    method = (f"dopri5-rtol{settings.rtol:g}" if settings.sampler == "dopri5"
              else f"{settings.sampler}{settings.num_steps}")
    parts += [method, f"cfg{settings.cfg_scale:g}",
              f"g{settings.guided_channels_value}"]
    if settings.precision != "fp32":
        parts.append(settings.precision)
    if settings.clip_denoised is not None and settings.clip_denoised != (provenance.get("vae") == "pixel"):
        parts.append("clip" if settings.clip_denoised else "noclip")  # only when not the automatic choice
    if settings.is_flow and settings.shift != 1:
        parts.append(f"shift{settings.shift:g}")
    if settings.guidance_interval is not None:
        lo, hi = settings.guidance_interval
        parts.append(f"gi{lo:g}-{hi:g}" if settings.is_flow else f"gi{int(lo)}-{int(hi)}")
    parts.append(f"seed{seed}")
    if num_samples is not None:
        parts.append(f"n{num_samples}")
    return "-".join(parts).replace("++", "pp")
