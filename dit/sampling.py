"""Sampling with classifier-free guidance: DDPM, DDIM and DPM-Solver++, a PNG grid or thousands
of images to an ADM `.npz`, split across ranks and resumable.

Determinism is per sample: sample i's initial noise, its per-step noise and its label come from
generators seeded by (global seed, i) alone, and sample i always shares its network batch with
the same samples (block i // batch_size, see `sample_blocks`), so a bulk `.npz` is
byte-identical for any number of ranks and across interruptions.

Guidance (contract 6 in DESIGN.md): the conditional and the unconditional (null class =
`num_classes`) passes run as one batch through `DiT.forward_with_cfg`; `cfg_scale == 1` skips
the unconditional pass entirely, and so does any step outside the optional guidance interval.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.checkpoint import write_atomic, write_text_atomic
from dit.diffusion import GaussianDiffusion, MeanType, create_diffusion, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++")
LABEL_MODES = ("uniform", "balanced")
# Independent random streams per sample: its noise (initial and per step) and its label.
NOISE_STREAM, LABEL_STREAM = 0, 1
SHARD_SETTINGS = "settings.json"


# --------------------------------------------------------------------------------------
# Pixels, seeds, labels
# --------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in ~[-1, 1] -> (N, H, W, 3) uint8, as the reference converts samples:
    clamp(127.5 x + 128, 0, 255), then truncation (contract 3)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoded images (N, 3, H, W), got shape {tuple(images.shape)}")
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def sample_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed` (numpy's SeedSequence mixing, so
    neighbouring indices get unrelated streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (CPU, so its noise is the same whatever device samples it)."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """x_T: (N, *shape), row i drawn from generators[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, mode: str = "uniform") -> torch.Tensor:
    """Class labels for samples `indices`: "uniform" draws each independently (the reference
    protocol for FID-50K), "balanced" cycles through the classes (index mod num_classes)."""
    idx = [int(i) for i in indices]
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in idx], dtype=torch.long)
    if mode == "uniform":
        return torch.tensor(
            [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(sample_seed(seed, i, LABEL_STREAM))))
             for i in idx], dtype=torch.long)
    raise ValueError(f"unknown label mode {mode!r}: use one of {LABEL_MODES}")


# --------------------------------------------------------------------------------------
# The network as the samplers see it
# --------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / FSDP wrappers


def _parse_guided_channels(guided_channels) -> int | str:
    if guided_channels == "all":
        return "all"
    if isinstance(guided_channels, str) and guided_channels.isdigit():
        return int(guided_channels)
    return guided_channels


class GuidedDenoiser:
    """fn(x (B, C, H, W), t (B,) original timesteps) -> the network output (B, C_out, H, W) with
    classifier-free guidance applied. Counts network passes (`calls`) and rows (`rows`): a
    guided step is one pass over 2B rows, an unguided one a pass over B rows."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, cfg_scale: float, guided_channels=3,
                 guidance_interval: Sequence[int] | None = None):
        self.model = model
        num_classes = model.config.num_classes
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale}")
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{num_classes - 1}")
        self.guided = float(cfg_scale) != 1.0
        if self.guided and model.y_embedder.embedding_table.num_embeddings <= num_classes:
            raise ValueError("cfg_scale != 1 needs the null-class embedding, but this model was built with "
                             "class_dropout_prob=0: sample with cfg_scale=1")
        if guidance_interval is not None:
            lo, hi = (int(v) for v in guidance_interval)
            if not 0 <= lo <= hi:
                raise ValueError(f"guidance_interval must be [lo, hi] timesteps with 0 <= lo <= hi, got {guidance_interval}")
            guidance_interval = (lo, hi)
        guided_channels = _parse_guided_channels(guided_channels)
        if guided_channels != "all" and not (isinstance(guided_channels, int) and not isinstance(guided_channels, bool)
                                             and 0 < guided_channels <= model.config.in_channels):
            raise ValueError(f"guided_channels must be 1..{model.config.in_channels} or 'all' (3 reproduces the paper), "
                             f"got {guided_channels!r}")
        self.labels = labels
        self.null = torch.full_like(labels, num_classes)
        self.cfg_scale = float(cfg_scale)
        self.guided_channels = guided_channels
        self.interval = guidance_interval
        self.calls = self.rows = 0

    def guides_at(self, t: int) -> bool:
        """Whether the step at original timestep t is guided."""
        if not self.guided:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_unused) -> torch.Tensor:
        self.calls += 1
        # All samples of a batch are at the same step, so one decision serves the batch.
        if not self.guides_at(int(t[0])):
            self.rows += len(x)
            return self.model(x, t, self.labels)
        self.rows += 2 * len(x)
        both = torch.cat([x, x])  # (2B, C, H, W): conditional half, then unconditional half
        out = self.model.forward_with_cfg(both, torch.cat([t, t]), torch.cat([self.labels, self.null]),
                                          self.cfg_scale, self.guided_channels)
        return out[: len(x)]  # both halves hold the same guided output


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


def sampling_chain(diffusion: GaussianDiffusion, num_steps: int) -> GaussianDiffusion:
    """The chain a DDPM/DDIM sampler walks: `diffusion` itself when it already has `num_steps`
    steps, otherwise the full chain respaced to `num_steps` evenly spaced timesteps including
    both ends ("250" -> {0, 4, ..., 995, 999}: DiT's sampler)."""
    if diffusion.num_timesteps == num_steps:
        return diffusion
    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError(f"the diffusion passed is already respaced to {diffusion.num_timesteps} steps, not {num_steps}: "
                         "pass the full chain (create_diffusion('')) or one respaced to num_steps")
    use = space_timesteps(diffusion.original_num_steps, str(num_steps))
    return GaussianDiffusion(diffusion.betas, use_timesteps=use, mean_type=diffusion.mean_type,
                             var_type=diffusion.var_type, loss_type=diffusion.loss_type)


def _dpm_solver(denoiser: GuidedDenoiser, diffusion: GaussianDiffusion, noise: torch.Tensor, num_steps: int,
                progress: bool) -> torch.Tensor:
    """Multistep DPM-Solver++(2M) (Lu et al. 2022) through diffusers, on the same beta schedule.

    Learned sigma: only the first C (epsilon) channels are handed to the solver. We do not use
    diffusers' `variance_type="learned_range"`, which keeps a hard-coded 3 channels and would
    drop the 4th latent channel of a KL-f8 model.
    """
    from diffusers import DPMSolverMultistepScheduler

    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError("dpm++ needs the full (not respaced) diffusion chain: pass create_diffusion('') or None")
    if diffusion.mean_type != MeanType.EPSILON:
        raise ValueError("dpm++ is wired for epsilon-prediction models (DiT)")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="epsilon", lower_order_final=True)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in tqdm(scheduler.timesteps, desc="dpm++", disable=not progress, leave=False):
        t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        eps = denoiser(x, t_batch)[:, :channels]
        x = scheduler.step(eps, t, x).prev_sample
    return x


def sample_latents(model: torch.nn.Module, diffusion: GaussianDiffusion | None, labels, *, cfg_scale: float,
                   noise: torch.Tensor, sampler: str = "ddpm", num_steps: int = 250, guided_channels=3,
                   guidance_interval: Sequence[int] | None = None, eta: float = 0.0,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   progress: bool = False, denoiser_out: list | None = None) -> torch.Tensor:
    """Draw x_0 (N, C, H, W) from x_T = `noise` for class `labels` (N,).

    Args:
        diffusion: the full (training) chain, or one already respaced to `num_steps`; None builds
            the linear-schedule chain matching the model's `learn_sigma`.
        sampler: "ddpm" (ancestral; DiT's 250 steps), "ddim" (eta=0 deterministic), "dpm++"
            (DPM-Solver++(2M), for 10-25 steps).
        guided_channels: 3 (the paper's evaluation) or "all"; see `DiT.forward_with_cfg`.
        guidance_interval: (lo, hi) original timesteps; guidance only for lo <= t <= hi, the
            conditional model alone elsewhere (Kynkäänniemi et al. 2024). None: every step.
        generator: the per-step noise of ddpm / ddim(eta>0): one generator, or a list with one
            per sample (batch-independent results).
        denoiser_out: if a list is given, the `GuidedDenoiser` is appended (to read its counts).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if sampler in ("ddpm", "ddim") and int(num_steps) < 2:
        # A respaced chain needs both ends (t = 999 and t = 0); one step has no posterior to walk.
        raise ValueError(f"the {sampler} sampler needs num_steps >= 2 (a chain from t=999 to t=0), got {num_steps}")
    model = _unwrap(model)
    device = noise.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    cfg = model.config
    expected = (len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must be (N, C, H, W) = {expected} for {len(labels)} labels and this model, "
                         f"got {tuple(noise.shape)}")
    if diffusion is None:
        diffusion = create_diffusion("", learn_sigma=cfg.learn_sigma)
    denoiser = GuidedDenoiser(model, labels, cfg_scale, guided_channels, guidance_interval)
    if denoiser_out is not None:
        denoiser_out.append(denoiser)
    with _eval_mode(model), torch.no_grad():
        if sampler == "dpm++":
            return _dpm_solver(denoiser, diffusion, noise, int(num_steps), progress)
        chain = sampling_chain(diffusion, int(num_steps))
        if sampler == "ddpm":
            return chain.p_sample_loop(denoiser, noise.shape, noise=noise, progress=progress, generator=generator)
        return chain.ddim_sample_loop(denoiser, noise.shape, noise=noise, progress=progress, eta=eta, generator=generator)


def sample_images(model: torch.nn.Module, diffusion: GaussianDiffusion | None, autoencoder, labels, *,
                  cfg_scale: float, noise: torch.Tensor, sampler: str = "ddpm", num_steps: int = 250,
                  guided_channels=3, guidance_interval: Sequence[int] | None = None, eta: float = 0.0,
                  generator=None, progress: bool = False) -> np.ndarray:
    """`sample_latents`, decoded by the autoencoder: uint8 (N, H, W, 3)."""
    latents = sample_latents(model, diffusion, labels, cfg_scale=cfg_scale, noise=noise, sampler=sampler,
                             num_steps=num_steps, guided_channels=guided_channels,
                             guidance_interval=guidance_interval, eta=eta, generator=generator, progress=progress)
    with torch.no_grad():
        return to_uint8(autoencoder.decode(latents))


def sample_blocks(indices: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Group sample indices into the network batches they are computed in: index i belongs to
    block i // batch_size, whoever computes it.

    Why blocks: floating-point kernels (CPU and GPU GEMMs) round differently for different batch
    shapes, so a sample's last bits depend on which samples share its forward passes. With the
    batch fixed by the index, a sample is computed identically on any rank, in any order, before
    or after a resume, so the bulk file is byte-identical for any number of ranks. (A different
    batch size regroups the samples and may change low bits; see docs/sampling.md.)"""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        return []
    keys = indices // batch_size
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [block for block in np.split(indices, cuts)]


def rank_indices(num_samples: int, batch_size: int, rank: int, world_size: int,
                 skip_blocks: set[int] | frozenset = frozenset()) -> np.ndarray:
    """The sample indices rank `rank` computes: whole blocks (`sample_blocks`), dealt round-robin
    over the blocks still to do (those not in `skip_blocks`)."""
    todo = [b for b in range(-(-num_samples // batch_size)) if b not in skip_blocks]
    mine = todo[rank::world_size]
    if not mine:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(b * batch_size, min((b + 1) * batch_size, num_samples)) for b in mine])


def generate_samples(model, diffusion, autoencoder, indices: Sequence[int], *, seed: int, label_mode: str = "uniform",
                     labels: Sequence[int] | None = None, batch_size: int = 32, sampler: str = "ddpm",
                     num_steps: int = 250, cfg_scale: float = 1.5, guided_channels=3,
                     guidance_interval: Sequence[int] | None = None, eta: float = 0.0, device=None,
                     progress: bool = False, collect: bool = True,
                     on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None):
    """Samples number `indices` of a run seeded `seed`: (images uint8 (n, H, W, 3), labels int64
    (n,)), in the order of `indices`. Each sample's noise and label depend only on (seed, index);
    the network batches are the index blocks of `sample_blocks(indices, batch_size)`. `labels`
    overrides the label draw (one per index). `on_batch(indices, images, labels)` is called after
    each batch (bulk sampling writes its shards there); `collect=False` keeps nothing in memory
    and returns empty arrays."""
    model = _unwrap(model)
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
    bar = tqdm(total=len(indices), desc=f"sampling ({sampler}, {num_steps} steps)", disable=not progress, unit="img")
    for idx in blocks:
        y = torch.tensor([label_of[int(i)] for i in idx], dtype=torch.long)
        gens = sample_generators(seed, idx)
        noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size)).to(device)
        batch = sample_images(model, diffusion, autoencoder, y.to(device), cfg_scale=cfg_scale, noise=noise,
                              sampler=sampler, num_steps=num_steps, guided_channels=guided_channels,
                              guidance_interval=guidance_interval, eta=eta, generator=gens,
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
# Bulk sampling to an ADM .npz: split across ranks, resumable
# --------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _check_same_settings(old: dict, new: dict, where: Path) -> None:
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{where} holds samples made with different settings ({', '.join(diff)}): "
                         "delete it to start over, or choose another output path")


def _done_blocks(shard_dir: Path, batch_size: int) -> set[int]:
    """Blocks held by complete shards (temp files of interrupted writes are ignored)."""
    from dit.metrics import _open_npz

    done = set()
    for f in sorted(shard_dir.glob("shard-*.npz")):
        with _open_npz(f) as data:
            done.add(int(data["idx"][0]) // batch_size)
    return done


def settings_path_for(out_path: str | os.PathLike) -> Path:
    """Where the sampling settings of an output file live: next to it, `.json`."""
    return Path(out_path).with_suffix(".json")


def bulk_sample(model, diffusion, autoencoder, out_path: str | os.PathLike, *, num_samples: int, seed: int = 0,
                label_mode: str = "uniform", batch_size: int = 32, sampler: str = "ddpm", num_steps: int = 250,
                cfg_scale: float = 1.5, guided_channels=3, guidance_interval: Sequence[int] | None = None,
                eta: float = 0.0, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                provenance: dict | None = None, keep_shards: bool = False, progress: bool = True,
                on_shard_written: Callable[[int], None] | None = None) -> Path:
    """Sample `num_samples` images to an ADM `.npz` at `out_path` (`arr_0` uint8 (N, H, W, 3),
    `arr_1` labels), with the settings written next to it (`settings_path_for(out_path)`).

    Samples are computed in index blocks of `batch_size` (`sample_blocks`), dealt round-robin
    to the ranks, each block written as one shard (atomically) to `<out_path>.parts/`. A relaunch
    with the same settings, on any number of ranks, computes only the missing blocks, so the file
    is byte-identical to an uninterrupted run's; settings that differ from the shards' (the batch
    size included) are refused. `barrier` (e.g. `torch.distributed.barrier`) synchronises the
    ranks; rank 0 assembles the final file. Returns `out_path`.

    `provenance` (checkpoint path, step, ...) is recorded in the settings and must match on resume.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {label_mode!r}: use one of {LABEL_MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sync = barrier or (lambda: None)
    model = _unwrap(model)
    out_path = Path(out_path)
    shard_dir = out_path.with_name(out_path.name + ".parts")
    settings = {
        "num_samples": int(num_samples), "seed": int(seed), "labels": label_mode, "sampler": sampler,
        "batch_size": int(batch_size),  # fixes which samples share a network batch (see sample_blocks)
        "num_steps": int(num_steps), "cfg_scale": float(cfg_scale), "guided_channels": _parse_guided_channels(guided_channels),
        "guidance_interval": list(guidance_interval) if guidance_interval is not None else None, "eta": float(eta),
        "model_config": model.config.to_dict(),
        "autoencoder": autoencoder.to_dict() if hasattr(autoencoder, "to_dict") else str(autoencoder),
        "image_size": model.config.input_size * autoencoder.downsample_factor,
        **(provenance or {}),
    }
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON

    final_settings = settings_path_for(out_path)
    if out_path.is_file() and final_settings.is_file():
        _check_same_settings(json.loads(final_settings.read_text()), settings, out_path)
        return out_path  # already complete
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        if not (shard_dir / SHARD_SETTINGS).is_file():
            _write_json_atomic(shard_dir / SHARD_SETTINGS, settings)
    sync()
    # Every rank checks, so that all of them stop (rather than some waiting at a barrier).
    _check_same_settings(json.loads((shard_dir / SHARD_SETTINGS).read_text()), settings, shard_dir)
    done = _done_blocks(shard_dir, batch_size)
    sync()  # every rank has listed the shards before any rank writes a new one
    mine = rank_indices(num_samples, batch_size, rank, world_size, skip_blocks=done)

    def write_shard(idx: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        from dit.metrics import write_npz_atomic

        write_npz_atomic(shard_dir / f"shard-{int(idx[0]) // batch_size:08d}.npz",
                         {"idx": idx.astype(np.int64), "arr_0": images, "arr_1": labels.astype(np.int64)})
        if on_shard_written is not None:
            on_shard_written(len(idx))

    if len(mine):
        generate_samples(model, diffusion, autoencoder, mine, seed=seed, label_mode=label_mode, batch_size=batch_size,
                         sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, guided_channels=guided_channels,
                         guidance_interval=guidance_interval, eta=eta, progress=progress and rank == 0,
                         collect=False, on_batch=write_shard)
    sync()
    if rank == 0:
        _assemble(shard_dir, out_path, num_samples)
        _write_json_atomic(settings_path_for(out_path), settings)
        if not keep_shards:
            for f in shard_dir.iterdir():
                f.unlink()
            shard_dir.rmdir()
    sync()
    return out_path


def _assemble(shard_dir: Path, out_path: Path, num_samples: int, chunk: int = 1024) -> None:
    """Write the shards in sample order as the final `.npz`, streaming (memory holds a few shards,
    never all N images), atomically."""
    from dit.metrics import StreamedArray, _open_npz, write_npz_atomic

    shards = []  # (first index, last index, path, idx array)
    seen = np.zeros(num_samples, dtype=bool)
    image_shape = None
    for f in sorted(shard_dir.glob("shard-*.npz")):
        with _open_npz(f) as data:
            idx = data["idx"]
            if image_shape is None:
                image_shape = data["arr_0"].shape[1:]
        shards.append((int(idx.min()), int(idx.max()), f, idx))
        seen[idx] = True
    if image_shape is None or not seen.all():
        count = num_samples if image_shape is None else int((~seen).sum())
        raise RuntimeError(f"{count} of {num_samples} samples are missing from {shard_dir}: a rank failed; "
                           "relaunch the same command to finish them")
    labels = np.zeros(num_samples, dtype=np.int64)

    def image_chunks():
        loaded: dict[Path, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}  # path -> (hi, idx, images, labels)
        for start in range(0, num_samples, chunk):
            stop = min(start + chunk, num_samples)
            out = np.zeros((stop - start, *image_shape), dtype=np.uint8)
            for lo, hi, f, idx in shards:
                if hi < start or lo >= stop:
                    continue
                if f not in loaded:
                    with _open_npz(f) as data:
                        loaded[f] = (hi, data["idx"], data["arr_0"], data["arr_1"])
                _, s_idx, s_img, s_lab = loaded[f]
                sel = (s_idx >= start) & (s_idx < stop)
                out[s_idx[sel] - start] = s_img[sel]
                labels[s_idx[sel]] = s_lab[sel]
            for f in [f for f, entry in loaded.items() if entry[0] < stop]:
                del loaded[f]  # no later chunk needs it
            yield out

    # arr_0 is streamed first; arr_1 is complete by the time it is written.
    write_npz_atomic(out_path, {
        "arr_0": StreamedArray((num_samples, *image_shape), np.dtype(np.uint8), image_chunks()),
        "arr_1": StreamedArray((num_samples,), np.dtype(np.int64), _deferred(lambda: labels)),
    })


def _deferred(make):
    yield make()


# --------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 4, padding: int = 2) -> Path:
    """uint8 (N, H, W, 3) -> one PNG, `nrow` images per row, written atomically."""
    from PIL import Image

    from dit.metrics import check_images

    images = check_images(images)
    n, h, w, _ = images.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = img
    return write_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------
# Loading for the entry points
# --------------------------------------------------------------------------------------

# The decoder DiT's FID numbers were measured with; used for release files, which record none.
DEFAULT_RELEASE_VAE = "sd-ema"


def load_for_sampling(checkpoint: str | os.PathLike, *, which: str = "ema", model_name: str | None = None,
                      vae: str | None = None, device="cpu"):
    """(model, autoencoder, provenance) from a checkpoint: the model configuration as stored
    (or inferred from release-file shapes), the autoencoder recorded in the checkpoint unless
    `vae` names another, and a provenance dict for the settings file."""
    from dit.autoencoder import build_autoencoder
    from dit.checkpoint import load_dit_checkpoint

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist")
    model, meta = load_dit_checkpoint(path, which=which, model_name=model_name, device=device)
    stored = meta.get("autoencoder") or {}
    name = vae or stored.get("name") or DEFAULT_RELEASE_VAE
    scale = stored.get("scale_factor") if name == stored.get("name") else None
    autoencoder = build_autoencoder(name, scale_factor=scale, device=device)
    if autoencoder.latent_channels != model.config.in_channels:
        raise ValueError(f"vae={name} has {autoencoder.latent_channels} latent channels but the model takes "
                         f"{model.config.in_channels}: pass the autoencoder it was trained with (vae=...)")
    provenance = {"checkpoint": str(path.resolve()), "which": which if meta.get("format") == "ours" else "ema",
                  "step": meta.get("step"), "model_name": meta.get("model_name"), "vae": name}
    return model, autoencoder, provenance


def default_output_name(provenance: dict, *, sampler: str, num_steps: int, cfg_scale: float, guided_channels,
                        guidance_interval=None, seed: int, num_samples: int | None = None) -> str:
    """A file stem that states the protocol, e.g. `DiT-XL-2-256x256-ema-ddpm250-cfg1.5-g3-seed0-n50000`."""
    stem = Path(provenance["checkpoint"]).stem
    step = provenance.get("step")
    parts = [stem, provenance.get("which", "ema")]
    if step is not None and str(step) not in stem:
        parts.append(f"step{step}")
    parts += [f"{sampler}{num_steps}", f"cfg{cfg_scale:g}", f"g{guided_channels}"]
    if guidance_interval is not None:
        parts.append(f"gi{guidance_interval[0]}-{guidance_interval[1]}")
    parts.append(f"seed{seed}")
    if num_samples is not None:
        parts.append(f"n{num_samples}")
    return "-".join(parts).replace("++", "pp")
