"""The latents cache builder: `build_latent_cache` encodes every image of an ImageFolder (and its
mirror) once through the autoencoder and writes the posterior moments in shards, in the format
described in dit/data/latents.py (which also holds the reader, `LatentCacheDataset`).

    build_latent_cache("imagenet/train", build_autoencoder("sd-ema"), "cache/in256", 256)

The command line is `python -m dit.cache_latents` (dit/cli/cache_latents.py).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from dit.io.atomic import RecordingFile, read_json_file, write_atomic, write_text_atomic
from dit.data.images import BadImageError, ImageFolderDataset
from dit.data.workers import resolve_num_workers
from dit.data.latents import (
    BUILD_FILE,
    CACHE_FORMAT_VERSION,
    META_FILE,
    LatentCacheMismatch,
    load_shard,
    shard_digest,
    shard_name,
    shard_problems,
)


def _save_shard(shard: dict, tmp: Path) -> None:
    """`torch.save` through an open file, not a file name: torch names the records inside the
    zip after the file it is given, and a temp file's name would change the shard's bytes."""
    with open(tmp, "wb") as f:
        recorder = RecordingFile(f)  # the same bytes as writing to f
        try:
            torch.save(shard, recorder)
        except RuntimeError:
            if recorder.error is not None:  # torch's zip writer hides a full disk behind "unexpected pos"
                raise recorder.error from None
            raise


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype, key: str = "dtype") -> str:
    """The name of a storage dtype given as a name or a torch dtype; `key` names the option."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported cache {key} {dtype!r}: use one of {sorted(_DTYPES)}")
        return dtype
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported cache {key} {dtype}: use one of {sorted(_DTYPES)}")


class _CacheItems(Dataset):
    """Image items for the cache builder: (image, label, index, ok, error message). With
    skip_bad, a bad file gives ok=False and a zero image so the batch still collates."""

    def __init__(self, images: ImageFolderDataset, indices: list[int]):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            x, label = self.images.load(index)
            return x, label, index, True, ""
        except BadImageError as err:
            if not self.images.skip_bad:
                raise
            size = self.images.image_size
            return torch.zeros(3, size, size), -1, index, False, str(err)


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class CacheFormat:
    """What a latents cache stores: recorded in its meta.json, and compared when a build resumes
    or reuses a cache (another value is refused).

    flip: also encode each image's horizontal mirror. dtype: the storage dtype of the std
    ("float16" halves its size; "float32" is exact); mean_dtype: the mean's ("float32": exactly
    the encoder's mean). Why the mean defaults to float32: float16 keeps 11 significant bits, so a
    mean rounds by up to 2**-11 of its size, which for the SD VAEs' means is not small against the
    posterior std the cache is meant to sample with (measured in docs/training.md, "Latents cache
    precision"); the std itself only scales the noise, and its relative rounding (at most 2**-11)
    is harmless. `mean_dtype="float16"` gives the format of caches written before this option
    (whose meta.json has no `mean_dtype`: their mean is in `dtype`). Dtypes are names or torch
    dtypes. shard_size: images per shard file. repa_dtype: the storage dtype of REPA features."""

    flip: bool = True
    dtype: str | torch.dtype = "float16"
    mean_dtype: str | torch.dtype = "float32"
    shard_size: int = 4096
    repa_dtype: str | torch.dtype = "float16"


@dataclass(frozen=True)
class CacheRun:
    """How this process builds a cache; none of it is compared with an existing cache.

    device: where the autoencoder runs (None: where its parameters are). skip_bad: skip an
    unreadable image with a warning (listed in meta.json) instead of failing. rank, world_size:
    which shards this process encodes (r, r + W, ...); None: torch.distributed's, else (0, 1)."""

    batch_size: int = 32
    num_workers: int | None = None  # None: dit.data.workers.default_num_workers()
    device: str | torch.device | None = None
    progress: bool = True
    skip_bad: bool = False
    rank: int | None = None
    world_size: int | None = None


def build_latent_cache(dataset_root, autoencoder, out_dir, image_size: int, fmt: CacheFormat = CacheFormat(),
                       run: CacheRun = CacheRun(), repa_encoder=None) -> Path:
    """Encode every image of an ImageFolder (and, with `fmt.flip`, its horizontal mirror) once and
    store the posterior moments in shards under `out_dir`. Returns `out_dir`.

    Why moments and both mirrors: training then draws `latent = (mean + std * eps) * scale` with
    fresh eps each step and picks a mirror at random, which is exactly what the reference's
    on-the-fly pipeline (crop, random flip, VAE posterior sample) computes, at a fraction of the
    cost. Flipping the latent instead would not be equivalent: the VAE is not mirror-symmetric.

    Resumable: rerunning with the same format skips shards already written. Distributed: with
    torch.distributed initialised (or explicit `run.rank`/`run.world_size`), rank r encodes shards
    r, r + W, ...; rank 0 writes `meta.json` after all shards exist.

    REPA features: with `repa_encoder` (a `dit.models.repa.Encoder`), each shard also holds that encoder's
    patch tokens of the same views (the image and, with `flip`, its mirror: the encoder is not
    mirror-symmetric either), in `fmt.repa_dtype`, so training from the cache needs no encoder.
    Size: T' x E x V values per image (DINOv2-B at 224 px with flips: 256 x 768 x 2, 768 KiB in
    float16): far more than the latents.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).expanduser()
    rank, world_size = run.rank, run.world_size
    if rank is None or world_size is None:
        rank, world_size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _is_distributed() else (0, 1)
        )
    shard_size = fmt.shard_size
    if run.batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {run.batch_size} and {shard_size}")
    images = ImageFolderDataset(dataset_root, image_size, hflip=False, skip_bad=run.skip_bad)
    settings = _cache_settings(images, autoencoder, image_size, fmt, repa_encoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, build_path = out_dir / META_FILE, out_dir / BUILD_FILE
    for existing_path in (meta_path, build_path):
        if existing_path.exists():
            _check_same_settings(existing_path, settings, out_dir)
    if meta_path.exists():
        return out_dir  # complete already
    if rank == 0:
        build = {**settings, "dataset_root": str(Path(dataset_root).expanduser().resolve())}
        write_text_atomic(build_path, json.dumps(build, indent=2))

    num_shards = math.ceil(len(images) / shard_size)
    todo = [k for k in range(rank, num_shards, world_size) if not (out_dir / shard_name(k)).exists()]
    total = sum(min((k + 1) * shard_size, len(images)) - k * shard_size for k in todo)
    device = run.device
    if device is None:
        device = next(iter(autoencoder.parameters()), torch.empty(0)).device
    repa = None
    if repa_encoder is not None:
        repa = (repa_encoder, _DTYPES[settings["repa"]["dtype"]],
                (0, 2 if fmt.flip else 1, settings["repa"]["num_tokens"], settings["repa"]["dim"]))
    encoding = _ShardEncoding(
        images, autoencoder, device, fmt.flip, (_DTYPES[settings["mean_dtype"]], _DTYPES[settings["dtype"]]),
        run.batch_size, resolve_num_workers(run.num_workers),
        empty_shape=(0, 2 if fmt.flip else 1, *settings["latent_shape"]), repa=repa,
    )

    with tqdm(total=total, desc=f"encoding (rank {rank})", unit="img", disable=not run.progress) as bar:
        for k in todo:
            shard_indices = list(range(k * shard_size, min((k + 1) * shard_size, len(images))))
            shard = _encode_shard(encoding, shard_indices, bar)
            write_atomic(out_dir / shard_name(k), functools.partial(_save_shard, shard))

    if _is_distributed():
        torch.distributed.barrier()  # every rank's shards are written
        if rank == 0:
            _finalize_cache(out_dir, settings, num_shards)
        torch.distributed.barrier()
    elif all((out_dir / shard_name(k)).exists() for k in range(num_shards)):
        _finalize_cache(out_dir, settings, num_shards)
    else:  # independent processes given rank/world_size: the last one to finish writes meta.json
        warnings.warn(f"rank {rank} done; {out_dir} is complete once every rank has finished", stacklevel=2)
    return out_dir


def _cache_settings(images: ImageFolderDataset, autoencoder, image_size: int, fmt: CacheFormat, repa_encoder) -> dict:
    """What meta.json records of the cache's format, as it reads back from JSON."""
    latent_side = autoencoder.latent_size(image_size)  # raises if not divisible
    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "autoencoder": autoencoder.to_dict(),
        "image_size": int(image_size),
        "latent_shape": [int(autoencoder.latent_channels), latent_side, latent_side],
        "num_classes": images.num_classes,
        "classes": list(images.classes),
        "num_files": len(images),
        "flip": bool(fmt.flip),
        "dtype": _dtype_name(fmt.dtype),  # the std's (and, in caches older than mean_dtype, the mean's)
        "mean_dtype": _dtype_name(fmt.mean_dtype, "mean_dtype"),
        "shard_size": int(fmt.shard_size),
    }
    if repa_encoder is not None:
        probe = repa_encoder(torch.zeros(1, 3, image_size, image_size))  # (1, T', E): the token count
        settings["repa"] = {**repa_encoder.to_dict(), "num_tokens": int(probe.shape[1]),
                            "dtype": _dtype_name(fmt.repa_dtype, "repa_dtype")}
    return json.loads(json.dumps(settings))  # compare like with like against a stored copy


def _check_same_settings(existing_path: Path, settings: dict, out_dir: Path) -> None:
    """LatentCacheMismatch unless the cache's meta.json (or build.json) records `settings`."""
    existing = read_json_file(existing_path, f"delete it and rerun this command: the shards in {out_dir} "
                                             "are reused")
    existing = {"mean_dtype": existing.get("dtype"), **existing}  # older caches: the mean in `dtype`
    keys = set(settings) | ({"repa"} & set(existing))  # a cache with features differs from one without
    differ = sorted(k for k in keys if existing.get(k) != settings.get(k))
    if differ:
        hint = (f" (it stores the mean in {existing['mean_dtype']}: mean_dtype={existing['mean_dtype']} "
                "resumes or reuses it)" if differ == ["mean_dtype"] else "")
        raise LatentCacheMismatch(
            f"{out_dir} already holds a latents cache built with different settings "
            f"({', '.join(differ)}){hint}: choose a new out_dir, or delete the old cache"
        )


@dataclass(frozen=True)
class _ShardEncoding:
    """How every shard of one build is encoded. save_dtypes: the storage dtypes of (mean, std);
    empty_shape: the mean's shape when no image of a shard is readable; repa: None, or
    (encoder, storage dtype, empty shape)."""

    images: ImageFolderDataset
    autoencoder: object
    device: str | torch.device
    flip: bool
    save_dtypes: tuple
    batch_size: int
    num_workers: int
    empty_shape: tuple
    repa: tuple | None = None


def _encode_shard(encoding: _ShardEncoding, shard_indices: list[int], bar) -> dict:
    """Encode one shard's images; returns the dict saved as the shard file."""
    e = encoding
    images, autoencoder, device, flip, repa = e.images, e.autoencoder, e.device, e.flip, e.repa
    mean_dtype, std_dtype = e.save_dtypes
    loader = DataLoader(
        _CacheItems(images, shard_indices), batch_size=e.batch_size, num_workers=e.num_workers,
        shuffle=False, pin_memory=torch.device(device).type == "cuda",
    )
    means, stds, labels, indices, skipped, feats = [], [], [], [], [], []
    for x, y, idx, ok, errors in loader:
        for i, good, err in zip(idx.tolist(), ok.tolist(), errors):
            if not good:
                warnings.warn(f"skipping unreadable image ({err})", stacklevel=3)
                skipped.append(images.samples[i][0])
        x, y, idx = x[ok], y[ok], idx[ok]
        if len(x):
            b = len(x)
            views = torch.cat([x, x.flip(-1)]) if flip else x  # (V * b, 3, H, W): images, then mirrors
            mean, std = autoencoder.encode_moments(views.to(device, non_blocking=True))  # (V * b, C, h, w)
            v = 2 if flip else 1
            means.append(mean.reshape(v, b, *mean.shape[1:]).transpose(0, 1).to("cpu", mean_dtype))  # (b, V, C, h, w)
            stds.append(std.reshape(v, b, *std.shape[1:]).transpose(0, 1).to("cpu", std_dtype))
            if repa is not None:
                f = repa[0](views)  # (V * b, T', E), the same views as the latents
                feats.append(f.reshape(v, b, *f.shape[1:]).transpose(0, 1).to("cpu", repa[1]))  # (b, V, T', E)
            labels.append(y)
            indices.append(idx)
        bar.update(len(ok))
    if not means:  # every file of this shard was unreadable (and skipped)
        means, stds = [torch.empty(e.empty_shape, dtype=mean_dtype)], [torch.zeros(e.empty_shape, dtype=std_dtype)]
        labels, indices = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)]
        feats = [torch.empty(repa[2], dtype=repa[1])] if repa is not None else []
    shard = {
        "mean": torch.cat(means).contiguous(),
        "labels": torch.cat(labels).to(torch.int64),
        "indices": torch.cat(indices).to(torch.int64),
        "skipped": skipped,
    }
    if repa is not None:
        shard["repa"] = torch.cat(feats).contiguous()  # (n, V, T', E)
    std = torch.cat(stds)
    if std.any():  # the pixel autoencoder is deterministic: no std to store
        shard["std"] = std.contiguous()
    return shard


def _finalize_cache(out_dir: Path, settings: dict, num_shards: int) -> None:
    """Check that every shard exists, then write meta.json (the mark of a complete cache), with
    each shard's count, size and SHA-256."""
    shards, skipped, count = [], [], 0
    for k in range(num_shards):
        path = out_dir / shard_name(k)
        if not path.exists():
            raise FileNotFoundError(
                f"latents cache {out_dir} is missing {path.name}: a rank did not finish; "
                "rerun the same command to resume"
            )
        shard = load_shard(path)
        # A shard of another build left in out_dir (other settings, older code) is not sealed
        # into the cache: the reader would refuse it anyway, better now, naming the fix.
        problems = shard_problems(shard, settings)
        if problems:
            raise LatentCacheMismatch(
                f"latents cache shard {path} {'; '.join(problems)}: it is not a shard of this build; delete it "
                "and rerun the same command (it encodes only the missing shard)"
            )
        n = len(shard["labels"])
        # The shard's size and SHA-256: the cache's identity covers its contents, not only its
        # settings, and the reader refuses a shard replaced after the build (dit/data/latents.py).
        shards.append({"file": path.name, "count": n, "bytes": path.stat().st_size, "sha256": shard_digest(path)})
        skipped.extend(shard["skipped"])
        count += n
    if count == 0:
        raise BadImageError(f"no readable image: all {len(skipped)} files were skipped; check the data path")
    meta = {**settings, "count": count, "num_skipped": len(skipped), "skipped": skipped, "shards": shards}
    write_text_atomic(out_dir / META_FILE, json.dumps(meta, indent=2))
    (out_dir / BUILD_FILE).unlink(missing_ok=True)


