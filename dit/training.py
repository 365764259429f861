"""The training loop and its parts: EMA, per-step randomness, the data stream, checkpoints with
exact resume, and metric logging. `train.py` resolves the hydra config and calls `run_training`.

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
import json
import logging
import math
import os
import random
import re
import signal
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
from dit.data import item_seed
from dit.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
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

    def __init__(self, dataset: Dataset, env: DistEnv, global_batch: int, seed: int, num_workers: int):
        from dit.data import DistributedResumableSampler

        self.dataset, self.env, self.global_batch = dataset, env, global_batch
        self.local_batch = global_batch // env.world_size
        self.seed, self.num_workers = seed, num_workers
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
            )
            yield from loader
            epoch, k = epoch + 1, 0


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
    """Drop metric lines after `step` (written by an interrupted attempt that is now redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


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


def _find_resume(cfg: TrainConfig, ckpt_dir: Path) -> tuple[Optional[Path], bool]:
    """(checkpoint to start from, whether it is this run directory's own)."""
    own = latest_checkpoint(ckpt_dir)
    if own is not None:
        return own, True
    if cfg.resume:
        return resolve_resume_path(cfg.resume), False
    return None, False


def load_start_state(cfg: TrainConfig, ckpt_dir: Path, config_dict: dict) -> Optional[dict]:
    """The checkpoint to continue from (this run directory's newest, else `cfg.resume`), or None.
    A checkpoint in the run directory whose recipe differs from `cfg` is refused."""
    from dit.checkpoint import load_state

    source, own = _find_resume(cfg, ckpt_dir)
    if source is None:
        return None
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
    return state


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
    value is used on every rank). Returns {"step", "loss", "checkpoint"} of the end of the run."""
    env = init_distributed(cfg.device)
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
        state = load_start_state(cfg, self.ckpt_dir, self.config_dict)

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
        self.stream = DataStream(self.data.dataset, env, cfg.global_batch_size, cfg.seed, cfg.data.num_workers)
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
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" and self.parallel != "fsdp")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, fused=fused or None)
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on this rank's rows of the global batch `self.step`: (loss, grad norm) as
        device tensors (no host sync)."""
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
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.detach().float(), full_tensor(grad_norm).float()

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Contract 2 of DESIGN.md. Collectives under FSDP: every rank gathers, rank 0 writes."""
        from dit.checkpoint import save_atomic

        ckpt = {
            "model": full_model_state(self.model),
            "ema": full_model_state(self.ema.module),
            "opt": full_optimizer_state(self.model, self.opt),
            "rng": {"ranks": gather_objects(rng_state(self.device), self.env)},
        }
        path = checkpoint_path(self.ckpt_dir, self.step)
        if self.env.is_main:
            ckpt.update(
                step=self.step, model_name=self.model_name, model_config=self.model.config.to_dict(),
                autoencoder=self.latents.spec, config=self.config_dict, data_state=self.stream.position(self.step),
                wandb_run_id=self.logger.run_id, format_version=CHECKPOINT_FORMAT_VERSION,
            )
            save_atomic(ckpt, path)
            for old in prune_checkpoints(self.ckpt_dir, self.cfg.ckpt.keep_last, self.cfg.ckpt.keep_every):
                log.info("deleted old checkpoint %s", old)
            log.info("saved checkpoint %s", path)
        barrier(self.env)
        return path

    # ---- the loop

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        self.train_module.train()
        loss_sum = torch.zeros((), device=self.device)
        norm_sum = torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        last_loss = float("nan")
        last_ckpt, last_save_time = latest_checkpoint(self.ckpt_dir), time.monotonic()
        batches = self.stream.batches(self.step)
        try:
            while self.step < cfg.max_steps:
                loss, grad_norm = self.train_step(*next(batches))
                step = self.step
                self.logger.step()
                loss_sum += loss
                norm_sum += grad_norm
                window_steps += 1
                save_now = step % cfg.ckpt.every == 0 or step == cfg.max_steps
                if step % cfg.log.every == 0 or step == cfg.max_steps:
                    # Rank 0's clock decides time-based saves, so that all ranks agree.
                    overdue = float(env.is_main and cfg.ckpt.every_minutes is not None
                                    and time.monotonic() - last_save_time > 60 * cfg.ckpt.every_minutes)
                    flags = torch.tensor(overdue, device=self.device)
                    totals = all_reduce_sum(torch.stack([loss_sum, norm_sum, flags]), env)
                    save_now = save_now or totals[2].item() > 0
                    elapsed = time.perf_counter() - window_start  # .item() above waited for the device
                    last_loss = totals[0].item() / env.world_size / window_steps  # mean over ranks and steps
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(
                            f"the training loss is {last_loss} at step {step}; the newest checkpoint is {last_ckpt}. "
                            "Lower optim.lr, set optim.grad_clip, or use precision=fp32"
                        )
                    self.logger.metrics(step, {
                        "train/loss": last_loss,
                        "train/grad_norm": totals[1].item() / env.world_size / window_steps,
                        "train/lr": self.opt.param_groups[0]["lr"],
                        "train/steps_per_sec": window_steps / elapsed,
                        "train/images_per_sec": window_steps * cfg.global_batch_size / elapsed,
                        "train/epoch": step / self.stream.steps_per_epoch,
                    })
                    loss_sum.zero_(), norm_sum.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                if self.grid is not None and step % cfg.log.samples.every == 0:
                    path = self.grid.sample(self.ema.module, self.diffusion, self.latents.autoencoder, step)
                    if path is not None:
                        self.logger.image(step, "samples", path)
                if save_now:
                    last_ckpt, last_save_time = self.save_checkpoint(), time.monotonic()
                if cfg.debug.kill_at_step is not None and step == cfg.debug.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # a crash test: no cleanup, no final checkpoint
        finally:
            self.logger.close()
        final = latest_checkpoint(self.ckpt_dir) if env.is_main else None
        return {"step": self.step, "loss": last_loss, "checkpoint": None if final is None else str(final)}


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
