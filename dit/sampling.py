"""Sampling with classifier-free guidance: `SamplerSettings` (the one description of how to
sample, used by every consumer), DDPM, DDIM and DPM-Solver++, and per-sample deterministic
batches of images. Bulk `.npz` files are `dit/bulk.py`; per-sample seeds, labels
and network batches are `dit/sample_order.py`; the chain a sampler walks (the trained one, from a
checkpoint's config) is `dit/sample_chain.py`; the forward precision is `dit/precision.py` (all
re-exported here).

Determinism is per sample: sample i's initial noise, its per-step noise and its label come from
generators seeded by (global seed, i) alone, and sample i always shares its network batch with
the same samples (block i // batch_size, see `sample_blocks`), so a bulk `.npz` is
byte-identical for any number of ranks and across interruptions.

Guidance (contract 6 in docs/design.md): the conditional and the unconditional (null class,
`dit.models.null_class`) passes run as one batch through `DiT.forward_with_cfg`; `cfg_scale == 1`
skips the unconditional pass entirely, and so does any step outside the optional guidance
interval.
"""

from __future__ import annotations

import contextlib
import hashlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.autoencoder import autoencoder_from_spec, build_autoencoder, warn_partial_guidance
from dit.checkpoint import load_dit_checkpoint
from dit.diffusion import GaussianDiffusion
from dit.files import to_uint8
from dit.models import null_class, parse_guided_channels
from dit.precision import PRECISIONS, check_precision, forward_precision
from dit.sample_chain import RELEASE_CHAIN, diffusion_from_config, dpm_solver, sampling_chain, trained_chain
from dit.sample_order import (LABEL_MODES, LABEL_STREAM, NOISE_STREAM, initial_noise, rank_indices, sample_blocks,
                              sample_generators, sample_labels, sample_seed)

__all__ = [  # what dit.sample_order defines is re-exported: per-sample randomness belongs to sampling
    "LABEL_MODES", "LABEL_STREAM", "NOISE_STREAM", "initial_noise", "rank_indices", "sample_blocks",
    "sample_generators", "sample_labels", "sample_seed",
    "RELEASE_CHAIN", "diffusion_from_config", "sampling_chain", "trained_chain", "PRECISIONS",  # the same for these
    "SAMPLERS", "SamplerSettings", "SETTINGS_FIELDS", "NonFiniteSamplesError", "check_finite_samples",
    "unwrap_model", "GuidedDenoiser", "sample_latents", "sample_images", "generate_samples",
    "DEFAULT_RELEASE_VAE", "load_for_sampling", "settings_path_for", "default_output_name",
]

SAMPLERS = ("ddpm", "ddim", "dpm++")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# How to sample
# --------------------------------------------------------------------------------------


@dataclass
class SamplerSettings:
    """Everything that decides how samples are drawn from a model, with the defaults of the
    paper's FID protocol (DDPM-250, guidance 1.5 on 3 channels). One type for sample.py,
    eval_fid.py, training grids, the evaluator, output names and the results table: a new
    sampler knob is a field here and its use in the sampler (and, to set it from the command
    line, `sampler.<field>` in conf/sampler/; the schema picks it up from this class).

    `guided_channels`: "3" (the paper's evaluation) or "all"; ints are accepted from Python.
    `guidance_interval`: [lo, hi] original timesteps; guidance only for lo <= t <= hi, the
    conditional model alone elsewhere (Kynkäänniemi et al. 2024). None: every step.
    `clip_denoised`: clamp each step's predicted x0 to [-1, 1] before the posterior mean (ADM's
    pixel models do). None: automatic, on for the pixel autoencoder, off for latent VAEs
    (`resolved(autoencoder)` decides; sample_latents alone, with no autoencoder, treats it as off).
    `precision`: the network forward in fp32 (IEEE: TF32 forced off), tf32, or bf16 (autocast on
    the forward only; the chain's arithmetic stays float32). See dit/precision.py.
    """

    sampler: str = "ddpm"  # ddpm (ancestral), ddim (eta=0: deterministic), dpm++ (DPM-Solver++(2M))
    num_steps: int = 250
    cfg_scale: float = 1.5  # 1: no guidance (and no null pass)
    guided_channels: str = "3"
    guidance_interval: Optional[list[int]] = None
    eta: float = 0.0  # DDIM's noise: 0 deterministic, 1 DDPM-like (at most 1)
    clip_denoised: Optional[bool] = None  # None: on for vae=pixel, off for latent VAEs
    precision: str = "fp32"  # fp32 | tf32 | bf16: the network forward's arithmetic

    def check(self) -> "SamplerSettings":
        """Raise ValueError naming the field whose value cannot work; returns self. (Whether
        `guided_channels` fits a model's channels is checked against the model when sampling.)"""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: use one of {SAMPLERS}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.sampler in ("ddpm", "ddim") and int(self.num_steps) < 2:
            # A respaced chain needs both ends (t = 999 and t = 0); one step has no posterior to walk.
            raise ValueError(f"the {self.sampler} sampler needs num_steps >= 2 (a chain from t=999 to t=0), "
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
            interval = list(self.guidance_interval)
            if len(interval) != 2 or not 0 <= int(interval[0]) <= int(interval[1]):
                raise ValueError(f"guidance_interval must be [lo, hi] timesteps with 0 <= lo <= hi, "
                                 f"got {self.guidance_interval}")
        if self.clip_denoised not in (None, True, False):
            raise ValueError(f"clip_denoised must be true, false or null (automatic: on for vae=pixel), "
                             f"got {self.clip_denoised!r}")
        check_precision(self.precision)
        return self

    def resolved(self, autoencoder) -> "SamplerSettings":
        """A copy with `clip_denoised` decided for `autoencoder`: as given, or (None) on for the
        pixel autoencoder (the model works on [-1, 1] images, as ADM's pixel models) and off for a
        latent VAE (latents are not bounded by [-1, 1])."""
        if self.clip_denoised is not None:
            return self
        return dataclasses.replace(self, clip_denoised=getattr(autoencoder, "name", None) == "pixel")

    @property
    def guided_channels_value(self) -> int | str:
        """`guided_channels` as settings files record it and the model takes it: 3 or "all"."""
        g = self.guided_channels
        return int(g) if isinstance(g, str) and g.isdigit() else g

    def to_dict(self) -> dict:
        """Every field, as recorded next to samples (plain JSON types; a subclass's extra fields,
        such as a training grid's `every`, are not sampler settings and are left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)}
        interval = self.guidance_interval
        out.update(num_steps=int(self.num_steps), cfg_scale=float(self.cfg_scale), eta=float(self.eta),
                   guided_channels=self.guided_channels_value,
                   guidance_interval=[int(v) for v in interval] if interval is not None else None)
        return out


SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings))


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN or inf (latents or decoded images): nothing is written from such a
    batch. Callers that know the checkpoint prefix its path to the message."""


def _describe(settings: SamplerSettings) -> str:
    d = settings.to_dict()
    return ", ".join(f"{k}={d[k]}" for k in ("sampler", "num_steps", "cfg_scale", "eta", "guided_channels"))


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
    """fn(x (B, C, H, W), t (B,) original timesteps) -> the network output (B, C_out, H, W) with
    classifier-free guidance applied as `settings` say. Counts network passes (`calls`) and rows
    (`rows`): a guided step is one pass over 2B rows, an unguided one a pass over B rows."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, settings: SamplerSettings):
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
        self.interval = (int(interval[0]), int(interval[1])) if interval is not None else None
        self.calls = self.rows = 0

    def guides_at(self, t: int) -> bool:
        """Whether the step at original timestep t is guided."""
        if not self.guided:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_unused) -> torch.Tensor:
        self.calls += 1
        # All samples of a batch are at the same step, so one decision serves the batch.
        guided = self.guides_at(int(t[0]))
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


def sample_latents(model: torch.nn.Module, diffusion: GaussianDiffusion | None, labels, settings: SamplerSettings, *,
                   noise: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
                   progress: bool = False, denoiser_out: list | None = None) -> torch.Tensor:
    """Draw x_0 (N, C, H, W) from x_T = `noise` for class `labels` (N,), as `settings` say.
    Non-finite results raise `NonFiniteSamplesError` (checked once, at the end).

    Args:
        diffusion: the full chain the model was trained on (`diffusion_from_config`), or one
            already respaced to `settings.num_steps`; None: the release chain (linear, 1000
            steps) with the model's `learn_sigma`. `settings.clip_denoised` None counts as off.
        generator: the per-step noise of ddpm / ddim(eta>0): one generator, or a list with one
            per sample (batch-independent results).
        denoiser_out: if a list is given, the `GuidedDenoiser` is appended (to read its counts).
    """
    settings.check()
    model = unwrap_model(model)
    device = noise.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    cfg = model.config
    expected = (len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must be (N, C, H, W) = {expected} for {len(labels)} labels and this model, "
                         f"got {tuple(noise.shape)}")
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


def sample_images(model: torch.nn.Module, diffusion: GaussianDiffusion | None, autoencoder, labels,
                  settings: SamplerSettings, *, noise: torch.Tensor, generator=None, progress: bool = False) -> np.ndarray:
    """`sample_latents`, decoded by the autoencoder: uint8 (N, H, W, 3), with `clip_denoised`
    resolved for this autoencoder. Non-finite latents or decoded images raise
    `NonFiniteSamplesError` (they would become black images)."""
    settings = settings.resolved(autoencoder)
    latents = sample_latents(model, diffusion, labels, settings, noise=noise, generator=generator, progress=progress)
    with torch.no_grad():
        return to_uint8(check_finite_samples(autoencoder.decode(latents), settings, "decoded images"))


def generate_samples(model, diffusion, autoencoder, indices: Sequence[int], settings: SamplerSettings, *, seed: int,
                     batch_size: int, label_mode: str = "uniform", labels: Sequence[int] | None = None, device=None,
                     progress: bool = False, collect: bool = True,
                     on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None):
    """Samples number `indices` of a run seeded `seed`: (images uint8 (n, H, W, 3), labels int64
    (n,)), in the order of `indices`. Each sample's noise and label depend only on (seed, index);
    the network batches are the index blocks of `sample_blocks(indices, batch_size)`. `labels`
    overrides the label draw (one per index). `on_batch(indices, images, labels)` is called after
    each batch (bulk sampling writes its shards there); `collect=False` keeps nothing in memory
    and returns empty arrays."""
    settings.check()
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
        batch = sample_images(model, diffusion, autoencoder, y.to(device), settings, noise=noise, generator=gens,
                              progress=progress and len(blocks) == 1)  # one batch: show its steps
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
                      vae: str | None = None, vae_scale_factor: float | None = None, device="cpu"):
    """(model, autoencoder, provenance) from a checkpoint: the model configuration as stored
    (or inferred from release-file shapes), the autoencoder recorded in the checkpoint unless
    `vae` names another (its latent scale: `vae_scale_factor`, else the checkpoint's for its own
    autoencoder, else the VAE's), and a provenance dict for the settings file, which names the
    diffusion chain the model was trained on (`provenance["diffusion"]`, from the checkpoint's
    config; the linear 1000-step chain for release files): `diffusion_from_config(provenance,
    learn_sigma)` builds it."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist")
    model, meta = load_dit_checkpoint(path, which=which, model_name=model_name, device=device)
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
                  "step": meta.get("step"), "model_name": meta.get("model_name"), "vae": name,
                  "diffusion": trained_chain(meta.get("config"))}
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
    parts += [f"{settings.sampler}{settings.num_steps}", f"cfg{settings.cfg_scale:g}",
              f"g{settings.guided_channels_value}"]
    if settings.precision != "fp32":
        parts.append(settings.precision)
    if settings.clip_denoised is not None and settings.clip_denoised != (provenance.get("vae") == "pixel"):
        parts.append("clip" if settings.clip_denoised else "noclip")  # only when not the automatic choice
    if settings.guidance_interval is not None:
        parts.append(f"gi{settings.guidance_interval[0]}-{settings.guidance_interval[1]}")
    parts.append(f"seed{seed}")
    if num_samples is not None:
        parts.append(f"n{num_samples}")
    return "-".join(parts).replace("++", "pp")
