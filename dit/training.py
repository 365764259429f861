"""The training loop and its parts: EMA, per-step randomness, the data stream, checkpoints with
exact resume, metric logging, and fault handling (preemption signals, non-finite steps, corrupt
checkpoints, failed writes: docs/reliability.md). `train.py` resolves the hydra config and calls
`run_training`.

Reproducibility is by construction rather than by saved RNG states:

- the data order of epoch e is a permutation seeded by (seed, e) (`DistributedResumableSampler`),
  and an item's augmentation (flip, posterior noise) is seeded by (seed, e, index);
- the diffusion timesteps, the diffusion noise and the label-dropout mask of step s are drawn
  for the whole *global* batch from a generator seeded by (seed, s); each rank takes its rows.

So a run resumed at step s sees exactly what the uninterrupted run saw, and the result does not
depend on how the global batch is split across ranks (up to floating-point summation order).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import math
import os
import random
import re
import signal
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from dit.config import (
    ConfigError,
    TrainConfig,
    check_resolution,
    check_static,
    config_mismatches,
    resolve_architecture,
)
from dit.checkpoint import write_text_atomic
from dit.data import item_seed
from dit.distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    full_model_state,
    full_optimizer_state,
    full_tensor,
    gather_objects,
    init_distributed,
    load_full_optimizer_state,
    reshard,
    shard_model,
    wrap_model,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
# Stream ids for `item_seed(seed, step, stream)`: far above any dataset index, so they never
# collide with the per-item streams of the datasets (seed, epoch, index).
_STEP_STREAM = 1 << 62  # (seed, step): the step's timesteps, noise and label-dropout mask
_GRID_STREAM = (1 << 62) + 1  # (seed, 0 | 1): the sample grids' noise and sampler noise
_RANK_STREAM = (1 << 62) + (1 << 20)  # + rank, (seed, step): the rank's global RNGs
_LOADER_STREAM = (1 << 62) + (1 << 40)  # + rank, (seed, epoch): DataLoader worker base seeds


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters, held as a second model (same class,
    same state-dict keys: the official layout), never trained and always in eval mode.

    `update` is one fused `torch._foreach_lerp_` over all tensors instead of a Python loop of
    `mul_`/`add_` pairs: ema += (1 - decay) * (param - ema)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        # Under FSDP both models are sharded alike and these are matching local shards.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def build_optimizer(params, o, device: torch.device, parallel: str = "none") -> torch.optim.AdamW:
    """AdamW with the hyperparameters of `o` (an `OptimConfig`).

    `o.fused=None` picks torch's fused AdamW kernel (one pass over each tensor's parameter,
    gradient and two moments) on CPU and CUDA: on a 33M-parameter model it took 59 ms per step
    on one CPU core against 187 ms for the default multi-tensor (foreach) kernel, which makes about
    eight passes (benchmarks/README.md). FSDP2's sharded (DTensor) parameters keep the foreach
    kernel. Both kernels compute the same update and keep the same state (step, exp_avg,
    exp_avg_sq), so a run may resume under either."""
    device = torch.device(device)
    fused = o.fused if o.fused is not None else (device.type in ("cpu", "cuda") and parallel != "fsdp")
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=fused or None)


# --------------------------------------------------------------------------------------
# Randomness of one step
# --------------------------------------------------------------------------------------


@dataclass
class StepRandomness:
    """What one rank draws for its rows of the global batch of one step."""

    t: torch.Tensor  # (b,) diffusion timesteps in [0, T)
    noise: torch.Tensor  # (b, C, H, W) diffusion noise
    drop: torch.Tensor  # (b,) bool: replace the label by the null class (CFG training)
    posterior: Optional[torch.Tensor]  # (b, C, H, W) eps of the VAE posterior sample, or None


def step_randomness(
    seed: int, step: int, global_batch: int, shape: tuple, num_timesteps: int, drop_prob: float,
    rank: int, world_size: int, device: torch.device, posterior: bool = False,
) -> StepRandomness:
    """Draw the global batch's randomness from a generator seeded by (seed, step), then keep
    the rows of this rank: global positions rank, rank + W, ... (the sampler's assignment)."""
    g = torch.Generator(device=device).manual_seed(item_seed(seed, step, _STEP_STREAM))
    t = torch.randint(0, num_timesteps, (global_batch,), generator=g, device=device)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)
    drop = torch.rand((global_batch,), generator=g, device=device) < drop_prob
    eps = torch.randn((global_batch, *shape), generator=g, device=device) if posterior else None
    rows = slice(rank, None, world_size)
    return StepRandomness(t[rows], noise[rows], drop[rows], None if eps is None else eps[rows])


def take_over_label_dropout(model: nn.Module) -> float:
    """Switch off the model's own random label dropout and return its rate: the training step
    draws the mask itself (from the step's global generator), so that which labels are dropped
    does not depend on the number of ranks. The null-class row stays in the embedding table."""
    embedder = model.y_embedder
    prob = float(embedder.dropout_prob)
    embedder.dropout_prob = 0.0
    return prob


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class ItemSeeded(Dataset):
    """Makes a dataset that draws its augmentation from torch's global RNG (e.g. the toy set's
    flip) deterministic per item: item i of epoch e runs under the seed (seed, e, i), whichever
    worker loads it and whenever. The global RNG of the caller is left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, index))
            return self.dataset[index]


@dataclass
class TrainData:
    dataset: Dataset  # has set_epoch(epoch)
    num_classes: int
    encoded: bool  # items are latents already (a latents cache)
    image_size: int
    latent_shape: Optional[tuple] = None  # (C, h, w), known for a cache
    autoencoder_spec: Optional[dict] = None  # the cache's autoencoder


def build_data(cfg: TrainConfig) -> TrainData:
    """The training set named by `cfg.data`, its augmentation seeded by `cfg.seed`."""
    d = cfg.data
    if d.kind == "toy":
        from dit.toy import NUM_CLASSES, ToyShapesDataset

        ds = ToyShapesDataset(d.num_per_class, d.image_size, seed=d.seed, hflip=d.hflip)
        return TrainData(ItemSeeded(ds, cfg.seed), NUM_CLASSES, False, d.image_size)
    if d.kind == "imagefolder":
        from dit.data import ImageFolderDataset

        ds = ImageFolderDataset(d.root, d.image_size, hflip=d.hflip, skip_bad=d.skip_bad, seed=cfg.seed)
        return TrainData(ds, ds.num_classes, False, d.image_size)
    if d.kind == "latents":
        from dit.data import LatentCacheDataset

        ds = LatentCacheDataset(d.root, hflip=d.hflip, sample_posterior=cfg.vae.sample_posterior, seed=cfg.seed)
        cached_size = int(ds.meta["image_size"])
        if d.image_size is not None and d.image_size != cached_size:
            raise ConfigError(
                f"data.image_size={d.image_size} but the latents cache {d.root} holds {cached_size}x{cached_size} "
                "images: drop data.image_size (it is read from the cache) or use a cache of that size"
            )
        return TrainData(ds, ds.num_classes, True, cached_size, tuple(ds.latent_shape), dict(ds.autoencoder_spec))
    raise ConfigError(f"data.kind={d.kind!r} is not one of imagefolder, latents, toy")


class DataStream:
    """This rank's batches, epoch after epoch, starting at any step.

    Epoch e covers `steps_per_epoch` global batches of the sampler's epoch-e order; a run
    resumed at step s starts in epoch s // steps_per_epoch at position (s % steps_per_epoch) * B.
    Workers are restarted each epoch so that they see the new epoch of the dataset."""

    def __init__(self, dataset: Dataset, env: DistEnv, global_batch: int, seed: int, num_workers: int,
                 worker_ignored_signals: tuple[int, ...] = ()):
        from dit.data import DistributedResumableSampler

        self.dataset, self.env, self.global_batch = dataset, env, global_batch
        self.local_batch = global_batch // env.world_size
        self.seed, self.num_workers = seed, num_workers
        # SLURM signals every process of a job: workers ignore the preemption signals, so that
        # they keep loading until the training process has written its checkpoint.
        self.worker_ignored_signals = tuple(worker_ignored_signals)
        self.sampler = DistributedResumableSampler(len(dataset), env.world_size, env.rank, seed=seed, drop_last=True)
        self.steps_per_epoch = self.sampler.total_size // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(dataset)} items, fewer than global_batch_size={global_batch}: "
                "lower global_batch_size or use more data"
            )

    def position(self, step: int) -> dict:
        """Where step `step` starts in the data order (stored in checkpoints)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "position": k * self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                "dataset_size": len(self.dataset)}

    def batches(self, start_step: int):
        epoch, k = divmod(start_step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start_index=k * self.global_batch)
            self.dataset.set_epoch(epoch)
            loader = DataLoader(
                self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
                num_workers=self.num_workers, pin_memory=self.env.device.type == "cuda",
                persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                # Seeds the workers' base seed without touching the global RNG.
                generator=torch.Generator().manual_seed(item_seed(self.seed, epoch, _LOADER_STREAM + self.env.rank)),
                worker_init_fn=(functools.partial(_ignore_signals, self.worker_ignored_signals)
                                if self.num_workers and self.worker_ignored_signals else None),
            )
            yield from loader
            epoch, k = epoch + 1, 0


def _ignore_signals(signums: tuple[int, ...], worker_id: int) -> None:
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

_CKPT_NAME = re.compile(r"^(\d+)\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{step:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `ckpt_dir`, oldest first. Temporary files of
    an interrupted write do not match the name pattern."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir) if (m := _CKPT_NAME.match(name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep_last: Optional[int], keep_every: Optional[int] = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and those at multiples of
    `keep_every`). Returns the deleted paths."""
    if keep_last is None:
        return []
    found = list_checkpoints(ckpt_dir)
    deleted = []
    for step, path in found[: max(0, len(found) - keep_last)]:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


# Temp files of `dit.checkpoint.save_atomic` (".0000100.pt.<pid>.<hex>.tmp"), left behind when a
# write was killed: never loaded (the name pattern above excludes them), removed at the next start.
_CKPT_TEMP = re.compile(r"^\.\d+\.pt\..*\.tmp$")
_REQUIRED_KEYS = ("model", "ema", "opt", "step")


def remove_interrupted_writes(ckpt_dir: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that were killed midway. Returns their paths."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = [ckpt_dir / name for name in os.listdir(ckpt_dir) if _CKPT_TEMP.match(name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def read_training_checkpoint(path: Path) -> dict:
    """A checkpoint of ours, checked to hold what a resume needs. Raises CheckpointError (file
    unreadable, truncated, or not a training checkpoint) or UnsafeCheckpointError."""
    from dit.checkpoint import CheckpointError, load_state

    state = load_state(path)
    missing = [k for k in _REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this code (no {', '.join(missing)})")
    return state


def newest_readable_checkpoint(ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the newest checkpoint in `ckpt_dir` that loads, or (None, None) if there
    is none. A newer one that does not load (truncated by a crash outside our atomic write,
    bit rot, a bad copy) is renamed to `<name>.corrupt`, out of the way of resuming and pruning,
    with a warning naming it and the checkpoint used instead. A file that would run code is not
    skipped quietly: UnsafeCheckpointError. Call on one rank only (it renames files)."""
    from dit.checkpoint import CheckpointError, UnsafeCheckpointError

    bad = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = read_training_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            bad.append((path, err))
            continue
        for corrupt, err in bad:
            aside = corrupt.with_name(corrupt.name + ".corrupt")
            os.replace(corrupt, aside)
            log.warning("checkpoint %s is unreadable (%s); resuming from the previous one, %s, instead "
                        "(the unreadable file is kept as %s)", corrupt, err, path, aside.name)
        return path, state
    if bad:
        listed = "; ".join(f"{p.name}: {e}" for p, e in bad)
        raise CheckpointError(
            f"no checkpoint in {ckpt_dir} can be read ({listed}). Move them away to start the run over, or "
            "set resume=<a good checkpoint> in a new run directory"
        )
    return None, None


def resolve_resume_path(path: str) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory (or of its checkpoints/)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for d in (p / "checkpoints", p):
        latest = latest_checkpoint(d)
        if latest is not None:
            return latest
    raise ConfigError(f"resume={path}: no such checkpoint file, and no checkpoints in that directory")


def rng_state(device: torch.device) -> dict:
    """This process's global RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"].tolist()), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_process(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def plain_config(cfg: TrainConfig) -> dict:
    """The config as plain Python values (enums as strings), for checkpoints and wandb."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------


class RunLogger:
    """Metrics to `<run dir>/metrics.jsonl`, wandb (rank 0 only) and the tqdm bar (rank 0)."""

    def __init__(self, env: DistEnv, out_dir: Path, cfg: TrainConfig, config_dict: dict, run_id: Optional[str],
                 start_step: int):
        from tqdm.auto import tqdm

        self.env, self.out_dir = env, out_dir
        self.wandb = None
        self.run_id = run_id
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not env.is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        if not env.is_main:
            return
        self.metrics_file = out_dir / "metrics.jsonl"
        _truncate_metrics(self.metrics_file, start_step)
        mode = cfg.log.wandb.mode.value
        if mode != "disabled":
            import wandb

            if self.run_id is None:  # kept in checkpoints, so a resumed run logs to the same wandb run
                self.run_id = uuid.uuid4().hex[:8]
            self.wandb = wandb.init(
                project=cfg.log.wandb.project, entity=cfg.log.wandb.entity, group=cfg.log.wandb.group,
                tags=list(cfg.log.wandb.tags), name=cfg.name, id=self.run_id, resume="allow", mode=mode,
                dir=str(out_dir), config=config_dict,
            )

    def step(self) -> None:
        self.bar.update(1)

    def metrics(self, step: int, values: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
        log.info("step %d  %s", step, "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items()))
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by an interrupted attempt that is now redone), and
    a line that a crash (or a full disk) cut short."""
    if not path.exists():
        return

    def line_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf  # unreadable: dropped

    keep = [line for line in path.read_text().splitlines() if line and line_step(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def configure_backends(cfg: TrainConfig) -> None:
    precision = "tf32" if cfg.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_model(cfg: TrainConfig, input_size: int, in_channels: int, num_classes: int):
    from dit.models import DiT

    arch = resolve_architecture(cfg.model)
    return DiT(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        mlp_ratio=cfg.model.mlp_ratio, class_dropout_prob=cfg.model.class_dropout_prob,
        learn_sigma=cfg.model.learn_sigma, **arch,
    )


def _model_name(model) -> Optional[str]:
    from dit.models import arch_name

    c = model.config
    return arch_name(c.depth, c.hidden_size, c.num_heads, c.patch_size) if c.mlp_ratio == 4.0 else None


def _same_autoencoder(a: str, b: str) -> bool:
    """Two autoencoder names denote the same one (local directories compared as paths)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def _find_resume(cfg: TrainConfig, ckpt_dir: Path) -> tuple[Optional[Path], bool, Optional[dict]]:
    """(checkpoint to start from, whether it is this run directory's own, its state if read)."""
    own, state = newest_readable_checkpoint(ckpt_dir)
    if own is not None:
        return own, True, state
    if cfg.resume:
        return resolve_resume_path(cfg.resume), False, None
    return None, False, None


def load_start_state(cfg: TrainConfig, ckpt_dir: Path, config_dict: dict,
                     env: Optional[DistEnv] = None) -> Optional[dict]:
    """The checkpoint to continue from (this run directory's newest readable one, else
    `cfg.resume`), or None. A checkpoint in the run directory whose recipe differs from `cfg` is
    refused. Rank 0 chooses (and moves unreadable checkpoints aside); the other ranks load its
    choice. The state's "source" entry is the path it was read from."""
    from dit.checkpoint import load_state

    env = env or DistEnv(0, 0, 1, torch.device("cpu"))
    choice, state, error = (None, False), None, None
    if env.is_main:
        for path in remove_interrupted_writes(ckpt_dir):
            log.info("removed %s, left by a checkpoint write that was interrupted", path.name)
        try:
            source, own, state = _find_resume(cfg, ckpt_dir)
            choice = (None if source is None else str(source), own)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    # Every rank learns rank 0's outcome, so that none waits for the others after an error.
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 could not choose the checkpoint to resume from ({failed})")
    source, own = broadcast_object(choice, env)
    if source is None:
        return None
    source = Path(source)
    if state is None:
        state = load_state(source)
    differ = config_mismatches(state.get("config") or {}, config_dict)
    if differ and own:
        raise ConfigError(
            f"the run directory {ckpt_dir.parent} holds a run with a different configuration:\n  "
            + "\n  ".join(differ)
            + "\nStart a new run with name=<new name> (or hydra.run.dir=...), or continue from this run "
            "on purpose with resume=<its checkpoint> in a new directory"
        )
    if differ:
        log.warning("resuming from %s with a changed configuration:\n  %s", source, "\n  ".join(differ))
    log.info("resuming from %s (step %d)", source, state["step"])
    return {**state, "source": str(source)}


def check_checkpoint_fits(state: dict, model_config: dict, cfg: TrainConfig) -> None:
    """ConfigError, before any training, if the checkpoint to resume holds another DiT than the
    one this config and data build (e.g. a latents cache of another shape or class count)."""
    stored = state.get("model_config") or {}
    differ = {k: (v, model_config[k]) for k, v in stored.items() if k in model_config and model_config[k] != v}
    if not differ:
        return
    listed = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in sorted(differ.items()))
    data = ("latents cache" if cfg.data.kind == "latents" else "data") + (
        f" data.root={cfg.data.root}" if getattr(cfg.data, "root", None) else "")
    raise ConfigError(
        f"checkpoint {state.get('source', '')} does not fit the model this run builds from its config and {data} "
        f"({listed}): use the data (or latents cache) and model it was trained with, or start without it "
        "(a new run directory, no resume=)"
    )


@dataclass
class LatentSpace:
    """What the model sees: (channels, side, side) latents made by `autoencoder` (None when the
    data are cached latents and no sample grids need decoding)."""

    autoencoder: Optional[nn.Module]
    spec: dict  # Autoencoder.to_dict(), stored in checkpoints
    channels: int
    side: int
    sample_posterior: bool  # encode images to posterior samples (not the mean) in the step

    @property
    def shape(self) -> tuple:
        return (self.channels, self.side, self.side)


def build_latent_space(cfg: TrainConfig, data: TrainData, patch_size: int, device: torch.device) -> LatentSpace:
    from dit.autoencoder import build_autoencoder

    if data.encoded:
        spec = data.autoencoder_spec
        if not _same_autoencoder(cfg.vae.name, spec["name"]):
            raise ConfigError(
                f"vae.name={cfg.vae.name} but the latents cache {cfg.data.root} was encoded with "
                f"{spec['name']!r}: set vae.name={spec['name']} (vae=local vae.name=... for a directory)"
            )
        side = data.latent_shape[-1]
        if side % patch_size:
            raise ConfigError(
                f"the latents cache holds {side}x{side} latents (images {data.image_size}), "
                f"which model.patch_size={patch_size} does not divide: use a smaller patch size"
            )
        # The VAE is only needed to decode sample grids.
        ae = None
        if cfg.log.samples.every:
            ae = build_autoencoder(spec["name"], scale_factor=spec["scale_factor"], device=device)
        return LatentSpace(ae, spec, spec["latent_channels"], side, False)
    ae = build_autoencoder(cfg.vae.name, scale_factor=cfg.vae.scale_factor, device=device)
    side = check_resolution(data.image_size, ae.downsample_factor, patch_size)
    sample = cfg.vae.sample_posterior and ae.name != "pixel"  # pixels have no posterior noise
    return LatentSpace(ae, ae.to_dict(), ae.latent_channels, side, sample)


def run_training(cfg: TrainConfig, out_dir: str | os.PathLike) -> dict:
    """Train as configured, writing checkpoints, metrics and samples under `out_dir` (rank 0's
    value is used on every rank). Returns {"step", "loss", "checkpoint", "skipped_steps"} of the
    end of the run.

    Faults (docs/reliability.md): raises TrainingPreempted (a SystemExit with status
    fault.preempt_exit_code) after the checkpoint a preemption signal asked for,
    NonFiniteTrainingError after fault.max_nonfinite_steps consecutive non-finite steps, and
    CheckpointWriteError when a checkpoint cannot be written (the previous one is kept)."""
    env = init_distributed(cfg.device, timeout_minutes=cfg.fault.dist_timeout_minutes)
    try:
        return Trainer(cfg, Path(out_dir), env).run()
    finally:
        cleanup(env)


class Trainer:
    """Everything one rank holds during a run; built from the config, then `run()`."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, env: DistEnv):
        from dit.diffusion import create_diffusion

        check_static(cfg, env.world_size)  # before any data is read or weights loaded
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out_dir = Path(broadcast_object(str(out_dir.resolve()), env))  # one run directory for all ranks
        self.ckpt_dir = self.out_dir / "checkpoints"
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        configure_backends(cfg)
        self.config_dict = plain_config(cfg)
        state = load_start_state(cfg, self.ckpt_dir, self.config_dict, env)
        self.preempt_signals = tuple(getattr(signal, name) for name in cfg.fault.preempt_signals)

        self.data = build_data(cfg)
        arch = resolve_architecture(cfg.model)
        self.latents = build_latent_space(cfg, self.data, arch["patch_size"], self.device)
        self._build_model(state)
        self._build_optimizer(state)
        self.step = int(state["step"]) if state is not None else 0
        self._seed_rank(state)
        self.diffusion = create_diffusion(
            "", noise_schedule=cfg.diffusion.noise_schedule, learn_sigma=cfg.model.learn_sigma,
            diffusion_steps=cfg.diffusion.diffusion_steps,
        )
        self.stream = DataStream(self.data.dataset, env, cfg.global_batch_size, cfg.seed, cfg.data.num_workers,
                                 worker_ignored_signals=self.preempt_signals)
        # Steps with a non-finite loss or gradient: in total, and in the current unbroken run.
        self.nonfinite = dict((state or {}).get("nonfinite_steps") or {"total": 0, "consecutive": 0})
        if state is not None:
            size = (state.get("data_state") or {}).get("dataset_size")
            if size not in (None, len(self.data.dataset)):
                log.warning("the data set has %d items, the checkpoint's had %s: the data order differs from "
                            "the interrupted run's", len(self.data.dataset), size)
        self.logger = RunLogger(env, self.out_dir, cfg, self.config_dict,
                                state.get("wandb_run_id") if state is not None else None, self.step)
        self.grid = (_GridSampler(cfg, env, self.latents.shape, self.data.num_classes, self.out_dir)
                     if cfg.log.samples.every else None)

    # ---- construction

    def _build_model(self, state: Optional[dict]) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
        model = build_model(cfg, self.latents.side, self.latents.channels, self.data.num_classes).to(self.device)
        self.drop_prob = take_over_label_dropout(model)
        self.ema = EMA(model, cfg.ema.decay)
        if state is not None:
            check_checkpoint_fits(state, model.config.to_dict(), cfg)
            model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
        self.model_name = _model_name(model)
        log.info(
            "model %s: %s, %.2fM parameters, input %s, %d classes; %d rank(s), %s, global batch %d",
            self.model_name or "custom", model.config.to_dict(), sum(p.numel() for p in model.parameters()) / 1e6,
            self.latents.shape, self.data.num_classes, env.world_size, self.device, cfg.global_batch_size,
        )
        model.gradient_checkpointing = cfg.grad_checkpointing
        self.parallel = cfg.parallel.value if env.distributed else "none"
        if cfg.compile:
            if self.parallel == "fsdp":
                for block in model.blocks:  # per block, before sharding (FSDP2's recommended order)
                    block.compile()
            else:
                model.compile()  # in place: the state-dict keys stay the official ones
        self.model = model  # owns the parameters and the official state-dict keys
        self.train_module = wrap_model(model, env, self.parallel)  # what the step calls (DDP, FSDP or model)
        if self.parallel == "fsdp":
            shard_model(self.ema.module, env)  # sharded like the model, so EMA updates are shard-local

    def _build_optimizer(self, state: Optional[dict]) -> None:
        o = self.cfg.optim
        self.opt = build_optimizer(self.model.parameters(), o, self.device, self.parallel)
        if state is not None:
            load_full_optimizer_state(self.model, self.opt, state["opt"])
            for group in self.opt.param_groups:  # the config's hyperparameters, not the file's
                group.update(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _seed_rank(self, state: Optional[dict]) -> None:
        """Per-rank global RNG seeds derived from the one seed (nothing in the step draws from
        them; they are restored anyway, for any code that does)."""
        saved = (state or {}).get("rng", {}).get("ranks", [])
        if len(saved) == self.env.world_size:
            set_rng_state(saved[self.env.rank], self.device)
        else:
            seed_process(item_seed(self.cfg.seed, self.step, _RANK_STREAM + self.env.rank))

    # ---- one optimizer step

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and gradients of step `self.step + 1` on this rank's rows of its global batch:
        (loss, grad norm) as device tensors (no host sync). No update yet: `apply_update`."""
        cfg, lat = self.cfg, self.latents
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        r = step_randomness(
            cfg.seed, self.step, cfg.global_batch_size, lat.shape, self.diffusion.num_timesteps, self.drop_prob,
            self.env.rank, self.env.world_size, self.device, posterior=lat.sample_posterior,
        )
        with torch.no_grad():
            if self.data.encoded:
                x0 = x
            else:  # the VAE posterior sample (mean + std * eps) * scale; the identity for pixels
                mean, std = lat.autoencoder.encode_moments(x)
                x0 = (mean + std * r.posterior if lat.sample_posterior else mean).float() * lat.autoencoder.scale_factor
        y = torch.where(r.drop, torch.full_like(y, self.data.num_classes), y)  # null class id = num_classes

        bf16 = cfg.precision.value == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            losses = self.diffusion.training_losses(self.train_module, x0, r.t, model_kwargs={"y": y}, noise=r.noise)
            loss = losses["loss"].mean()
        if self.step + 1 in cfg.debug.nan_loss_at_steps:
            loss = loss * float("nan")  # fault injection: NaN loss, hence NaN gradients
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.step + 1 in cfg.debug.nan_grad_at_steps:  # fault injection: a finite loss, an inf gradient
            with torch.no_grad():
                next(p.grad for p in self.params if p.grad is not None).view(-1)[0] = float("inf")
        if cfg.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return loss.detach().float(), full_tensor(grad_norm).float()

    def apply_update(self) -> None:
        self.opt.step()
        self.ema.update(self.model)

    def step_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor, preempt: bool) -> tuple[bool, bool]:
        """(skip this step's update: non-finite loss or gradient on any rank, a preemption
        signal reached any rank). All ranks get the same answer: one all-reduce of two numbers
        and one host sync per step, done only when a check needs it."""
        check = self.cfg.fault.max_nonfinite_steps is not None
        if not check and not (self.env.distributed and self.preempt_signals):
            return False, preempt
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) if check else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([bad.float().to(self.device), torch.tensor(float(preempt), device=self.device)])
        bad, preempt = (v > 0 for v in all_reduce_sum(flags, self.env).tolist())
        return bad, preempt

    # ---- fault injection (debug.*)

    def _fault_here(self, when: str, step: int) -> bool:
        d = self.cfg.debug
        return (d.kill_at_step == step and d.kill_when.value == when
                and (d.kill_rank is None or d.kill_rank == self.env.rank))

    def _die(self) -> None:
        if self.cfg.debug.kill_how.value == "hang":  # a stuck rank: alive, never answering
            log.warning("debug: rank %d hangs at step %d", self.env.rank, self.cfg.debug.kill_at_step)
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no final checkpoint

    def _write_half_then_die(self, ckpt: dict, path: Path) -> None:
        """Start the atomic write of `ckpt` as `save_atomic` does, and die with half of it on disk."""
        from dit.checkpoint import write_atomic  # the real temp-file-and-rename path

        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        data = buffer.getbuffer()

        def write(tmp: Path) -> None:
            with open(tmp, "xb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            self._die()

        write_atomic(path, write)

    # ---- checkpoints

    def save_checkpoint(self, previous: Optional[Path] = None) -> Path:
        """Contract 2 of DESIGN.md. Collectives under FSDP: every rank gathers, rank 0 writes.
        Old checkpoints are pruned only once the new one is complete. A failed write (full disk)
        raises CheckpointWriteError on every rank, naming `previous`, which is kept."""
        from dit.checkpoint import CheckpointWriteError, save_atomic

        ckpt = {
            "model": full_model_state(self.model),
            "ema": full_model_state(self.ema.module),
            "opt": full_optimizer_state(self.model, self.opt),
            "rng": {"ranks": gather_objects(rng_state(self.device), self.env)},
        }
        path = checkpoint_path(self.ckpt_dir, self.step)
        error = None
        if self.env.is_main:
            ckpt.update(
                step=self.step, model_name=self.model_name, model_config=self.model.config.to_dict(),
                autoencoder=self.latents.spec, config=self.config_dict, data_state=self.stream.position(self.step),
                wandb_run_id=self.logger.run_id, format_version=CHECKPOINT_FORMAT_VERSION,
                nonfinite_steps=dict(self.nonfinite),
            )
            if self._fault_here("checkpoint_write", self.step):
                self._write_half_then_die(ckpt, path)
            try:
                save_atomic(ckpt, path)
            except CheckpointWriteError as err:
                error = err
            else:
                for old in prune_checkpoints(self.ckpt_dir, self.cfg.ckpt.keep_last, self.cfg.ckpt.keep_every):
                    log.info("deleted old checkpoint %s", old)
                log.info("saved checkpoint %s", path)
        failed = broadcast_object(None if error is None else str(error), self.env)  # also the barrier
        if failed is not None:
            kept = f"the newest complete checkpoint, {previous}, is kept" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"checkpoint at step {self.step} failed: {failed}; {kept}",
                                       errno=getattr(error, "errno", None)) from error
        return path

    # ---- the loop

    def run(self) -> dict:
        batches = self.stream.batches(self.step)
        with PreemptionWatch(self.preempt_signals) as watch:
            try:
                return self._loop(watch, batches)
            finally:
                # Stop the DataLoader workers now: left to the interpreter's exit, they would be
                # sent SIGTERM, which they ignore (see DataStream), and waited for forever.
                batches.close()
                self.logger.close()

    def _loop(self, watch: "PreemptionWatch", batches) -> dict:
        cfg, env = self.cfg, self.env
        max_bad = cfg.fault.max_nonfinite_steps
        self.train_module.train()
        loss_sum = torch.zeros((), device=self.device)
        norm_sum = torch.zeros((), device=self.device)
        window_steps, window_good, window_start = 0, 0, time.perf_counter()
        last_loss = float("nan")
        last_ckpt, last_save_time = latest_checkpoint(self.ckpt_dir), time.monotonic()
        while self.step < cfg.max_steps:
            loss, grad_norm = self.forward_backward(*next(batches))
            step = self.step + 1
            if self._fault_here("mid_step", step):
                self._die()
            bad, preempt = self.step_flags(loss, grad_norm, watch.received is not None)
            if bad:  # no optimizer or EMA update: the weights stay as they were
                self.nonfinite["total"] += 1
                self.nonfinite["consecutive"] += 1
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped "
                            "(%d in a row, %d in total; the run stops at %d in a row)", step, loss.item(),
                            grad_norm.item(), self.nonfinite["consecutive"], self.nonfinite["total"], max_bad)
            else:
                self.apply_update()
                self.nonfinite["consecutive"] = 0
                loss_sum += loss
                norm_sum += grad_norm
                window_good += 1
            self.step = step
            self.logger.step()
            window_steps += 1
            if max_bad is not None and self.nonfinite["consecutive"] >= max_bad:
                raise NonFiniteTrainingError(
                    f"training stopped at step {step}: the loss or gradient was NaN/inf in {max_bad} consecutive "
                    f"steps, {step - max_bad + 1}..{step} (their updates were skipped; no checkpoint was written). "
                    f"The newest checkpoint, {last_ckpt}, is intact and a relaunch resumes from it. Fix: lower "
                    "optim.lr, set optim.grad_clip, use precision=fp32, or check the data "
                    f"(fault.max_nonfinite_steps={max_bad} sets the limit)"
                )
            save_now = step % cfg.ckpt.every == 0 or step == cfg.max_steps
            if step % cfg.log.every == 0 or step == cfg.max_steps:
                # Rank 0's clock decides time-based saves, so that all ranks agree.
                overdue = float(env.is_main and cfg.ckpt.every_minutes is not None
                                and time.monotonic() - last_save_time > 60 * cfg.ckpt.every_minutes)
                flags = torch.tensor(overdue, device=self.device)
                totals = all_reduce_sum(torch.stack([loss_sum, norm_sum, flags]), env)
                save_now = save_now or totals[2].item() > 0
                elapsed = time.perf_counter() - window_start  # .item() above waited for the device
                # Means over ranks and the window's finite steps (NaN if all were skipped).
                last_loss = totals[0].item() / env.world_size / window_good if window_good else float("nan")
                if max_bad is None and not math.isfinite(last_loss):
                    raise NonFiniteTrainingError(
                        f"the training loss is {last_loss} at step {step}; the newest checkpoint is {last_ckpt}. "
                        "Lower optim.lr, set optim.grad_clip, or use precision=fp32"
                    )
                self.logger.metrics(step, {
                    "train/loss": last_loss,
                    "train/grad_norm": totals[1].item() / env.world_size / window_good if window_good else float("nan"),
                    "train/lr": self.opt.param_groups[0]["lr"],
                    "train/steps_per_sec": window_steps / elapsed,
                    "train/images_per_sec": window_steps * cfg.global_batch_size / elapsed,
                    "train/epoch": step / self.stream.steps_per_epoch,
                    "train/skipped_steps": self.nonfinite["total"],
                })
                loss_sum.zero_(), norm_sum.zero_()
                window_steps, window_good, window_start = 0, 0, time.perf_counter()
            if self.grid is not None and step % cfg.log.samples.every == 0:
                path = self.grid.sample(self.ema.module, self.diffusion, self.latents.autoencoder, step)
                if path is not None:
                    self.logger.image(step, "samples", path)
            forced = cfg.debug.kill_at_step == step and cfg.debug.kill_when.value == "checkpoint_write"  # every rank
            if save_now or preempt or forced:
                last_ckpt, last_save_time = self.save_checkpoint(last_ckpt), time.monotonic()
            if preempt:
                code = cfg.fault.preempt_exit_code
                log.warning("preempted (%s): wrote checkpoint %s at step %d; exiting with status %d so that the "
                            "launcher requeues the job; relaunching the same command resumes from it",
                            watch.signal_name or "a signal on another rank", last_ckpt, step, code)
                watch.hand_over()  # the launcher's own handler (submitit: requeue), if any
                raise TrainingPreempted(code)
            if self._fault_here("after_step", step):
                self._die()
        final = latest_checkpoint(self.ckpt_dir) if env.is_main else None
        return {"step": self.step, "loss": last_loss, "checkpoint": None if final is None else str(final),
                "skipped_steps": self.nonfinite["total"]}


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped because its loss or gradients stayed non-finite (NaN/inf)."""


class TrainingPreempted(SystemExit):
    """Raised after the checkpoint that a preemption signal asked for has been written. As a
    SystemExit it ends the process with status `code` (fault.preempt_exit_code) unless caught."""


class PreemptionWatch:
    """Turns the preemption signals into a flag that the loop reads at step boundaries (a
    handler that only sets a flag is safe whatever the process is doing when the signal comes).

    Handlers installed before (submitit's requeue handler on SIGUSR2, say) are remembered:
    `hand_over()` calls the one of the signal received, once the checkpoint is written. All
    handlers are restored on exit. Signals can only be handled in the main thread; elsewhere
    (a test calling `run_training` from a thread) the watch does nothing."""

    def __init__(self, signums: tuple[int, ...]):
        self.signums = tuple(signums)
        self.previous: dict[int, object] = {}
        self.received: Optional[int] = None

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            if self.signums:
                log.warning("not in the main thread: preemption signals are not handled")
            return self
        for signum in self.signums:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def hand_over(self) -> None:
        handler = self.previous.get(self.received)
        if callable(handler):
            handler(self.received, None)


class _GridSampler:
    """Sample grids of the EMA model from fixed noise and classes (the same images every time,
    so grids of successive steps are comparable)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, latent_shape: tuple, num_classes: int, out_dir: Path):
        s = cfg.log.samples
        self.cfg, self.env, self.out_dir = s, env, out_dir
        self.parallel = cfg.parallel.value if env.distributed else "none"
        g = torch.Generator().manual_seed(item_seed(cfg.seed, 0, _GRID_STREAM))
        self.noise = torch.randn((s.num_images, *latent_shape), generator=g)
        self.labels = torch.arange(s.num_images) * num_classes // s.num_images  # spread over the classes
        self.seed = item_seed(cfg.seed, 1, _GRID_STREAM)

    def sample(self, ema_module: nn.Module, diffusion, autoencoder, step: int) -> Optional[Path]:
        # Under FSDP the sharded EMA model needs every rank in the forward passes; under DDP the
        # replica on rank 0 suffices.
        if not (self.env.is_main or self.parallel == "fsdp"):
            return None
        from dit.sampling import sample_images, save_grid

        device = self.env.device
        images = sample_images(
            ema_module, diffusion, autoencoder, self.labels.to(device), cfg_scale=self.cfg.cfg_scale,
            noise=self.noise.to(device), sampler=self.cfg.sampler, num_steps=self.cfg.num_steps,
            guided_channels=self.cfg.guided_channels,
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )  # uint8 (N, H, W, 3)
        reshard(ema_module)  # FSDP: back to shards, as the EMA update expects
        if not self.env.is_main:
            return None
        return save_grid(images, self.out_dir / "samples" / f"{step:07d}.png", nrow=int(math.ceil(len(images) ** 0.5)))
