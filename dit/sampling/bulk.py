"""Bulk sampling to an ADM `.npz`: split across ranks, resumable, byte-identical for any number
of ranks and across interruptions (see `dit.sampling.order.sample_blocks` for why), for every
sampler alike (the SDE's per-step noise is per sample, as DDPM's). What to sample is a `BulkJob`;
how the ranks share it, `Ranks`; how, the resolved `Sampler`."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dit.io.atomic import write_json_atomic
from dit.io.npz import StreamedArray, open_npz, write_npz_atomic
from dit.sampling.guidance import unwrap_model
from dit.sampling.base import Sampler
from dit.sampling.images import SampleOrder, generate_samples
from dit.sampling.loading import settings_path_for
from dit.sampling.order import LABEL_MODES, rank_indices

SHARD_SETTINGS = "settings.json"
LOCK_FILE = ".lock"  # in the shard directory: held (flock) by the sampler writing this output


@dataclass(frozen=True)
class BulkJob:
    """What a bulk file holds: `num_samples` samples of seed `seed`, labels drawn by `label_mode`
    (uniform | balanced), network batches of `batch_size` (which fixes which samples share a
    forward pass, so it is recorded and must match on resume); `keep_shards` keeps
    `<out>.parts/` after assembling."""

    num_samples: int
    seed: int
    batch_size: int
    label_mode: str = "uniform"
    keep_shards: bool = False

    def check(self) -> "BulkJob":
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"unknown label mode {self.label_mode!r}: use one of {LABEL_MODES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    @property
    def order(self) -> SampleOrder:
        return SampleOrder(seed=self.seed, batch_size=self.batch_size, label_mode=self.label_mode)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks sharing a bulk job, and how they wait for each other
    (`barrier`, e.g. `torch.distributed.barrier`; None on one process)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier()


class BulkOutputBusyError(RuntimeError):
    """Another bulk sampler is writing the same output (it holds `<out>.parts/.lock`)."""


class _OutputLock:
    """An exclusive flock on `<out>.parts/.lock`, recording who holds it (pid, host, start time);
    the kernel releases it when the holder exits, also on kill -9."""

    def __init__(self, shard_dir: Path, out_path: Path):
        self.path = shard_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise BulkOutputBusyError(
                f"another bulk sampler is writing {out_path} (it holds {self.path}: {holder}): wait for it to "
                "finish (a relaunch then finds the file complete), or choose another output path") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _check_same_settings(old: dict, new: dict, where: Path) -> None:
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{where} holds samples made with different settings ({', '.join(diff)}): "
                         "delete it to start over, or choose another output path")


def _done_blocks(shard_dir: Path, batch_size: int) -> set[int]:
    """Blocks held by complete shards (temp files of interrupted writes are ignored)."""
    done = set()
    for f in sorted(shard_dir.glob("shard-*.npz")):
        with open_npz(f) as data:
            done.add(int(data["idx"][0]) // batch_size)
    return done


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: `os.path.samefile` where both exist (symlinks and hard
    links included), else their resolved paths (a path that does not exist yet is that file's)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:  # unreadable (permissions): fall back to the names
        pass
    return a.resolve() == b.resolve()


def check_bulk_output(out_path: str | os.PathLike, protected: dict[str, str | os.PathLike | None] | None = None,
                      key: str = "bulk.out") -> None:
    """What a bulk output may be, checked before any sampling. An ADM `.npz`, with its settings
    beside it (`settings_path_for`): any other name could make the two one file (bulk.out=X.json
    would be overwritten by its settings). Not one of the `protected` files ({key: path}, e.g. the
    reference, the samples or the checkpoint of eval_fid.py), also through a link: the samples
    would replace it. And never an existing file that is not a bulk file of ours: one without our
    settings beside it (a reference batch, samples from elsewhere) would be replaced. A finished
    bulk file (settings beside it) is checked against its settings, an interrupted one (shards and
    their settings in `<out>.parts/`, also after the assembly and before the settings file) resumes."""
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"bulk output {out_path} must end in .npz (the ADM sample format; its settings are "
                         f"written to {settings_path_for(out_path.with_suffix('.npz')).name} beside it): "
                         f"use {out_path.with_suffix('.npz')}")
    for name, other in (protected or {}).items():
        if other is not None and same_file(out_path, other):
            raise ValueError(f"{key}={out_path} is the same file as {name}={other}: the samples would be written "
                             f"over it; choose another {key}")
    ours = settings_path_for(out_path).is_file() or (out_path.with_name(out_path.name + ".parts") / SHARD_SETTINGS).is_file()
    if (out_path.exists() or out_path.is_symlink()) and not ours:
        raise ValueError(f"{key}={out_path} exists and is not a bulk file of ours (no sampling settings "
                         f"{settings_path_for(out_path).name} beside it): sampling would replace it; choose another "
                         f"{key}, or move the file away if it may be replaced")


def bulk_settings(model, autoencoder, sampler: Sampler, job: BulkJob, provenance: dict | None = None) -> dict:
    """Everything that determines the samples of a bulk file, as recorded next to it (and in
    its shard directory, to refuse resuming with other settings): `clip_denoised` as resolved for
    this autoencoder, and (in `provenance`, from `load_for_sampling`) the diffusion chain or the
    flow objective. A flow sampler's record holds its flow knobs and `nfe` per sample (None for
    dopri5, whose count is adaptive)."""
    record = {
        "num_samples": int(job.num_samples), "seed": int(job.seed), "labels": job.label_mode,
        "batch_size": int(job.batch_size),  # fixes which samples share a network batch (see sample_blocks)
        **sampler.settings.resolved(autoencoder).to_dict(),
        "model_config": model.config.to_dict(),
        "autoencoder": autoencoder.to_dict() if hasattr(autoencoder, "to_dict") else str(autoencoder),
        "image_size": model.config.input_size * autoencoder.downsample_factor,
        **(provenance or {}),
    }
    return json.loads(json.dumps(record, default=str))  # as it reads back from JSON


def bulk_sample(model, sampler: Sampler, autoencoder, out_path: str | os.PathLike, job: BulkJob, *,
                ranks: Ranks = Ranks(), provenance: dict | None = None, progress: bool = True,
                on_shard_written: Callable[[int], None] | None = None) -> Path:
    """Sample `job.num_samples` images with `sampler` to an ADM `.npz` at `out_path` (`arr_0`
    uint8 (N, H, W, 3), `arr_1` labels), with the settings written next to it
    (`settings_path_for(out_path)`).

    Samples are computed in index blocks of `job.batch_size` (`sample_blocks`), dealt round-robin
    to the ranks, each block written as one shard (atomically) to `<out_path>.parts/`. A relaunch
    with the same settings, on any number of ranks, computes only the missing blocks, so the file
    is byte-identical to an uninterrupted run's; settings that differ from the shards' (the batch
    size included) are refused. `ranks.barrier` synchronises the ranks; rank 0 assembles the
    final file. Returns `out_path`.

    `provenance` (checkpoint path, step, ...) is recorded in the settings and must match on resume.
    """
    job.check()
    rank, world_size, sync = ranks.rank, ranks.world_size, ranks.sync
    model = unwrap_model(model)
    out_path = Path(out_path)
    check_bulk_output(out_path)
    shard_dir = out_path.with_name(out_path.name + ".parts")
    record = bulk_settings(model, autoencoder, sampler, job, provenance)

    final_settings = settings_path_for(out_path)
    if out_path.is_file() and final_settings.is_file():
        _check_same_settings(json.loads(final_settings.read_text()), record, out_path)
        return out_path  # already complete
    created = rank == 0 and not shard_dir.exists()
    lock = None
    try:
        if rank == 0:
            shard_dir.mkdir(parents=True, exist_ok=True)
            lock = _OutputLock(shard_dir, out_path)  # a second sampler on this output stops here
            if world_size == 1 and out_path.is_file() and final_settings.is_file():  # another sampler just finished
                _check_same_settings(json.loads(final_settings.read_text()), record, out_path)
                if created:
                    _remove_shard_dir(shard_dir)
                return out_path
            if not (shard_dir / SHARD_SETTINGS).is_file():
                write_json_atomic(shard_dir / SHARD_SETTINGS, record)
        sync()
        _sample_shards((model, sampler, autoencoder), shard_dir, record, job, ranks,
                       progress=progress, on_shard_written=on_shard_written, created=created)
        if rank == 0:
            _assemble(shard_dir, out_path, job.num_samples)
            write_json_atomic(settings_path_for(out_path), record)
            if not job.keep_shards:
                _remove_shard_dir(shard_dir)
    finally:
        if lock is not None:
            lock.release()
    sync()
    return out_path


def _sample_shards(drawing: tuple, shard_dir: Path, record: dict, job: BulkJob, ranks: Ranks, *,
                   progress: bool, on_shard_written, created: bool) -> None:
    """This rank's missing blocks, each written as one shard; returns when every rank is done.
    `drawing`: (model, sampler, autoencoder)."""
    model, sampler, autoencoder = drawing
    batch_size, sync, rank = job.batch_size, ranks.sync, ranks.rank
    # Every rank checks, so that all of them stop (rather than some waiting at a barrier).
    _check_same_settings(json.loads((shard_dir / SHARD_SETTINGS).read_text()), record, shard_dir)
    done = _done_blocks(shard_dir, batch_size)
    sync()  # every rank has listed the shards before any rank writes a new one
    mine = rank_indices(job.num_samples, batch_size, rank, ranks.world_size, skip_blocks=done)

    def write_shard(idx: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        write_npz_atomic(shard_dir / f"shard-{int(idx[0]) // batch_size:08d}.npz",
                         {"idx": idx.astype(np.int64), "arr_0": images, "arr_1": labels.astype(np.int64)})
        if on_shard_written is not None:
            on_shard_written(len(idx))

    try:
        if len(mine):
            generate_samples(model, sampler, autoencoder, mine, job.order, progress=progress and rank == 0,
                             collect=False, on_batch=write_shard)
    except BaseException:
        if created and ranks.world_size == 1 and not any(shard_dir.glob("shard-*.npz")):
            _remove_shard_dir(shard_dir)  # nothing sampled: leave no folder behind (e.g. NaN samples)
        raise
    sync()


def _remove_shard_dir(shard_dir: Path) -> None:
    for f in shard_dir.iterdir():
        f.unlink()
    shard_dir.rmdir()


def _assemble(shard_dir: Path, out_path: Path, num_samples: int, chunk: int = 1024) -> None:
    """Write the shards in sample order as the final `.npz`, streaming (memory holds a few shards,
    never all N images), atomically."""
    shards = []  # (first index, last index, path, idx array)
    seen = np.zeros(num_samples, dtype=bool)
    image_shape = None
    for f in sorted(shard_dir.glob("shard-*.npz")):
        with open_npz(f) as data:
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
                    with open_npz(f) as data:
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
