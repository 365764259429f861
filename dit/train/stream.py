"""The training data as the step sees it: the data set named by the config, this rank's
batches from any step on (the data stream), and the latent space the model works in."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dit.autoencoder import autoencoder_from_config, autoencoder_from_spec
from dit.config import ConfigError, TrainConfig, check_resolution
from dit.data import DistributedResumableSampler, ImageFolderDataset, LatentCacheDataset, LatentCacheMismatch, item_seed
from dit.distributed import DistEnv
from dit.data.toy import NUM_CLASSES as TOY_CLASSES
from dit.data.toy import ToyShapesDataset
from dit.data.workers import resolve_num_workers
from dit.train.faults import ignore_signals
from dit.train.randomness import LOADER_STREAM, StepRandomness

log = logging.getLogger(__name__)


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
    identity: Optional[dict] = None  # what data this is (`data_identity`), stored in checkpoints


def _digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:16]


def data_identity(kind: str, dataset, **params) -> dict:
    """What data set this is, cheaply: its class names, number of items and a fingerprint
    (an ImageFolder: the sorted relative paths and sizes of its files, one stat each, and the first
    64 KiB of one file per class; a latents
    cache: its metadata; the toy set: its parameters). Stored in checkpoints and compared on
    resume (`dit.train.resume.check_same_data`)."""
    if kind == "imagefolder":
        root = str(dataset.root)
        files = sorted((os.path.relpath(path, root), os.path.getsize(path), label) for path, label in dataset.samples)
        # and the first bytes of one file per class: folders whose names were swapped (same
        # paths, maybe the same sizes) differ there
        firsts = {}
        for rel, _, label in files:
            firsts.setdefault(label, rel)
        heads = []
        for label, rel in sorted(firsts.items()):
            with open(os.path.join(root, rel), "rb") as f:
                heads.append(hashlib.sha256(f.read(1 << 16)).hexdigest())
        fingerprint = _digest([*files, *heads])
    elif kind == "latents":
        fingerprint = _digest([dataset.meta])
    else:
        fingerprint = _digest([params])
    return {"kind": kind, "classes": list(dataset.classes), "items": len(dataset), "fingerprint": fingerprint}


def build_data(cfg: TrainConfig, identify: bool = True) -> TrainData:
    """The training set named by `cfg.data`, its augmentation seeded by `cfg.seed`, with its
    `identity` (an ImageFolder's costs a stat of every file: `identify=False` skips it there)."""
    d = cfg.data
    if d.kind == "toy":
        ds = ToyShapesDataset(d.num_per_class, d.image_size, seed=d.seed, hflip=d.hflip, variant=d.variant)
        params = dict(num_per_class=d.num_per_class, image_size=d.image_size, seed=d.seed)
        if d.variant != "colours":  # the colour set keeps the identity it had before variants: its runs resume
            params["variant"] = d.variant
        identity = data_identity("toy", ds, **params)
        return TrainData(ItemSeeded(ds, cfg.seed), TOY_CLASSES, False, d.image_size, identity=identity)
    if d.kind == "imagefolder":
        ds = ImageFolderDataset(d.root, d.image_size, hflip=d.hflip, skip_bad=d.skip_bad, seed=cfg.seed)
        identity = data_identity("imagefolder", ds) if identify else None  # before a scan drops bad files
        if d.scan:
            skipped = ds.scan()
            log.info("data.scan: %d images readable%s", len(ds), f", {skipped} skipped" if skipped else "")
        return TrainData(ds, ds.num_classes, False, d.image_size, identity=identity)
    if d.kind == "latents":
        ds = LatentCacheDataset(d.root, hflip=d.hflip, sample_posterior=cfg.vae.sample_posterior, seed=cfg.seed)
        cached_size = int(ds.meta["image_size"])
        if d.image_size is not None and d.image_size != cached_size:
            raise ConfigError(
                f"data.image_size={d.image_size} but the latents cache {d.root} holds {cached_size}x{cached_size} "
                "images: drop data.image_size (it is read from the cache) or use a cache of that size"
            )
        return TrainData(ds, ds.num_classes, True, cached_size, tuple(ds.latent_shape), dict(ds.autoencoder_spec),
                         identity=data_identity("latents", ds))
    raise ConfigError(f"data.kind={d.kind!r} is not one of imagefolder, latents, toy")


class DataStream:
    """This rank's batches, epoch after epoch, starting at any step.

    Epoch e covers `steps_per_epoch` global batches of the sampler's epoch-e order; a run
    resumed at step s starts in epoch s // steps_per_epoch at position (s % steps_per_epoch) * B.
    Workers are restarted each epoch so that they see the new epoch of the dataset."""

    def __init__(self, dataset: Dataset, env: DistEnv, global_batch: int, seed: int, num_workers: Optional[int],
                 worker_ignored_signals: tuple[int, ...] = ()):
        self.dataset, self.env, self.global_batch = dataset, env, global_batch
        self.local_batch = global_batch // env.world_size
        # None (data.num_workers=null, the default): what the machine has (dit/data/workers.py).
        self.seed, self.num_workers = seed, resolve_num_workers(num_workers)
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
                generator=torch.Generator().manual_seed(item_seed(self.seed, epoch, LOADER_STREAM + self.env.rank)),
                worker_init_fn=(functools.partial(ignore_signals, self.worker_ignored_signals)
                                if self.num_workers and self.worker_ignored_signals else None),
            )
            iterator = iter(loader)
            try:
                yield from iterator
            except Exception as err:
                restore_worker_message(err)  # the file and the fix, not the worker's traceback
                raise
            finally:
                # On an error in a worker (a truncated image), on close() and at the end of an
                # epoch alike. Left to the garbage collector, the workers of an error outlive the
                # run: the exception's traceback holds the iterator, and at the interpreter's exit
                # multiprocessing sends them SIGTERM, which they ignore, and waits for them forever.
                stop_workers(iterator)
            epoch, k = epoch + 1, 0


def stop_workers(iterator) -> None:
    """Stop the workers of a DataLoader iterator now: the loader's own shutdown (a sentinel, a
    join of up to 5 s each, SIGTERM), then SIGKILL for any worker still alive: one blocked in a
    read ignores the SIGTERM (see DataStream). Single-process loaders have no workers."""
    workers = list(getattr(iterator, "_workers", ()))  # torch's _MultiProcessingDataLoaderIter
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


# What torch's DataLoader makes of an exception raised in a worker: the same type, constructed
# with "Caught <type> in DataLoader worker process <n>.\nOriginal Traceback ...", the worker's
# whole traceback as its message, which would fill the program's one-line error.
_WORKER_MESSAGE = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def restore_worker_message(err: Exception) -> None:
    """Give `err`, raised by a DataLoader worker, the message it had there (for a BadImageError:
    the file and the fix); the worker's traceback becomes a note, shown with the traceback
    (HYDRA_FULL_ERROR=1). Other exceptions are left as they are."""
    text = str(err)
    if isinstance(err, KeyError) or not _WORKER_MESSAGE.match(text):
        return
    kind, module = type(err), type(err).__module__
    name = kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    at = text.rfind(f"\n{name}: ")  # the traceback's last line: "<module>.<type>: <message>"
    if at >= 0:
        err.args = (text[at + len(name) + 3:].rstrip("\n"),)
        err.add_note(text.rstrip("\n"))


# --------------------------------------------------------------------------------------
# The latent space
# --------------------------------------------------------------------------------------


@dataclass
class LatentSpace:
    """What the model sees: (channels, side, side) latents made by `autoencoder` (None when the
    data are cached latents and no sample grids need decoding)."""

    autoencoder: Optional[nn.Module]
    spec: dict  # Autoencoder.to_dict(), stored in checkpoints
    channels: int
    side: int
    sample_posterior: bool  # encode images to posterior samples (not the mean) in the step
    encoded: bool = False  # the data items are latents already (a cache)

    @property
    def shape(self) -> tuple:
        return (self.channels, self.side, self.side)

    @torch.no_grad()
    def to_latents(self, x: torch.Tensor, r: StepRandomness) -> torch.Tensor:
        """A batch of data items -> x0 for the diffusion: the VAE posterior sample
        (mean + std * eps) through the latent transform (`z * scale` for SD's VAE) with the step's
        eps (the mean if not sampling; the identity for pixels), or the items themselves for a
        latents cache."""
        if self.encoded:
            return x
        mean, std = self.autoencoder.encode_moments(x)
        return self.autoencoder.transform.apply((mean + std * r.posterior if self.sample_posterior else mean).float())


def build_latent_space(cfg: TrainConfig, data: TrainData, patch_size: int, device: torch.device) -> LatentSpace:
    if data.encoded:
        spec = data.autoencoder_spec
        try:  # the cache's own check: the configured autoencoder, and whole patches
            data.dataset.check_compatible(autoencoder_spec={"name": cfg.vae.name}, patch_size=patch_size)
        except LatentCacheMismatch as err:
            raise ConfigError(str(err)) from None
        side = data.latent_shape[-1]
        # The VAE is only needed to decode sample grids.
        ae = None
        if cfg.log.samples.every:
            ae = autoencoder_from_spec(spec, device=device)
        return LatentSpace(ae, spec, spec["latent_channels"], side, False, encoded=True)
    ae = autoencoder_from_config(cfg.vae, device=device)
    side = check_resolution(data.image_size, ae.downsample_factor, patch_size)
    sample = cfg.vae.sample_posterior and ae.name != "pixel"  # pixels have no posterior noise
    return LatentSpace(ae, ae.to_dict(), ae.latent_channels, side, sample)
