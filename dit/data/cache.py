"""Datasets for training: images from an ImageFolder, or latents cached once through the
autoencoder, and the sampler that fixes (and resumes) the data order.

    ds = ImageFolderDataset("imagenet/train", image_size=256)        # (3, 256, 256) in [-1, 1], label
    build_latent_cache("imagenet/train", build_autoencoder("sd-ema"), "cache/in256", 256)
    ds = LatentCacheDataset("cache/in256")                           # (4, 32, 32) scaled latent, label
    sampler = DistributedResumableSampler(len(ds), world_size, rank, seed)

Randomness (horizontal flip, posterior noise) is a pure function of (seed, epoch, index), not
of a global RNG or of which DataLoader worker loads the item: a resumed run, or a run with a
different number of workers, sees exactly the same data.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from dit.checkpoint import write_atomic, write_text_atomic

CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"  # written last: its presence means the cache is complete
BUILD_FILE = "build.json"  # the settings of a cache being built, for resuming


class BadImageError(OSError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


class LatentCacheMismatch(ValueError):
    """A latents cache that does not fit the model or the requested settings."""


# --------------------------------------------------------------------------------------
# Pixels: the ADM center crop and [-1, 1] tensors
# --------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's preprocessing (used by DiT): shrink by exact factors of 2 with a box filter while
    the short side is at least twice the target (cheap and alias-free), resize with bicubic so
    the short side equals `image_size`, then cut the central `image_size` square."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    width, height = pil_image.size
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1], computed as the reference's
    ToTensor + Normalize(0.5, 0.5) so the numbers match bit for bit."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    return x.float().div(255).sub(0.5).div(0.5)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; any failure becomes a BadImageError naming the file.
    (PIL decodes lazily, so `convert` is what surfaces a truncated file.)"""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise BadImageError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Replace or delete the file, "
            "or set skip_bad=True to skip unreadable images"
        ) from err


# --------------------------------------------------------------------------------------
# Per-item randomness
# --------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item of one epoch. Hashing (rather than e.g. seed + index) keeps the
    streams of neighbouring items and epochs unrelated."""
    h = 0
    for value in (seed, epoch, index):
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h >> 1


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def _draw_flip(generator: torch.Generator) -> bool:
    return bool(torch.randint(0, 2, (1,), generator=generator).item())


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _check_image_root(root: Path) -> None:
    """Clear errors for the layouts torchvision would reject with a terse message."""
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist: set the data path to an ImageFolder directory")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory: set the data path to an ImageFolder directory")
    if not _class_folders(root):
        has_images = any(name.lower().endswith(IMG_EXTENSIONS) for name in os.listdir(root))
        hint = "the images sit directly in it" if has_images else "it is empty"
        raise ValueError(
            f"empty dataset: image folder {root} has no class subfolders ({hint}); "
            "put each class's images in its own subfolder, root/<class>/<image>"
        )


class ImageFolderDataset(Dataset):
    """torchvision's ImageFolder (one subfolder per class, sorted names -> labels 0..K-1) with the
    ADM center crop, a seeded horizontal flip, and errors that name the offending file.

    Items: (float tensor (3, image_size, image_size) in [-1, 1], int label).

    The flip of item i in epoch e is decided by `item_seed(seed, e, i)`; call `set_epoch(e)` before
    each epoch (before creating the DataLoader iterator; with `persistent_workers=True` the
    workers would keep the old epoch).

    A file that cannot be decoded raises BadImageError naming it. With `skip_bad=True` it is
    skipped with a warning instead and the next readable item is returned in its place;
    `num_skipped` counts the distinct bad files this process met (DataLoader workers count in
    their own copies). `scan()` decodes every file up front for an exact count before training.
    """

    def __init__(self, root, image_size: int, hflip: bool = True, skip_bad: bool = False, seed: int = 0):
        root = Path(root).expanduser()
        _check_image_root(root)
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = root
        self.folder = ImageFolder(str(root), loader=load_rgb, allow_empty=True)
        counts = np.bincount(np.asarray(self.folder.targets, dtype=np.int64), minlength=len(self.folder.classes))
        if counts.sum() == 0:
            raise ValueError(
                f"empty dataset: no image files under {root} (extensions {', '.join(IMG_EXTENSIONS)}); "
                "add images to its class subfolders"
            )
        empty = [name for name, n in zip(self.folder.classes, counts) if n == 0]
        if empty:
            listed = ", ".join(str(root / name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(
                f"{len(empty)} empty class folder(s) without image files: {listed}; "
                "add images or remove the folder(s) so labels stay contiguous"
            )
        self.samples: list[tuple[str, int]] = list(self.folder.samples)
        self.image_size = int(image_size)
        self.hflip = hflip
        self.skip_bad = skip_bad
        self.seed = int(seed)
        self.epoch = 0
        self.bad_files: set[str] = set()

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    @property
    def num_skipped(self) -> int:
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _note_bad(self, path: str, err: BadImageError) -> None:
        if path not in self.bad_files:
            self.bad_files.add(path)
            warnings.warn(f"skipping unreadable image ({err})", stacklevel=3)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """The cropped image tensor (never flipped) and label of item `index`; BadImageError if
        the file is unreadable."""
        path, label = self.samples[index]
        return pil_to_tensor(center_crop_arr(load_rgb(path), self.image_size)), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip = self.hflip and _draw_flip(item_generator(self.seed, self.epoch, index))
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            try:
                x, label = self.load(candidate)
                break
            except BadImageError as err:
                if not self.skip_bad:
                    raise
                self._note_bad(self.samples[candidate][0], err)
        else:
            raise BadImageError(f"no readable image under {self.root}")
        if flip:
            x = x.flip(-1)  # (3, H, W): mirror the width axis
        return x, label

    def scan(self, progress: bool = True) -> int:
        """Decode every image once. Raises on the first bad file, or with `skip_bad` drops bad
        files from the index (changing `len`) and returns how many were dropped."""
        from tqdm.auto import tqdm

        good = []
        for path, label in tqdm(self.samples, desc="checking images", disable=not progress):
            try:
                load_rgb(path)
                good.append((path, label))
            except BadImageError as err:
                if not self.skip_bad:
                    raise
                self._note_bad(path, err)
        if not good:
            raise BadImageError(f"no readable image under {self.root}")
        self.samples = good
        return self.num_skipped


# --------------------------------------------------------------------------------------
# The latents cache
# --------------------------------------------------------------------------------------
#
# Layout of `out_dir`:
#   shard_00000.pt ...   torch.save dicts (weights_only-loadable, read with mmap):
#                          mean  (n, V, C, h, w)  posterior mean, unscaled; V = 2 with flips
#                                                 (view 0 the image, view 1 its mirror), else 1
#                          std   (n, V, C, h, w)  posterior std, unscaled (absent when all zero,
#                                                 as for the pixel autoencoder)
#                          labels (n,) int64, indices (n,) int64 (ImageFolder index),
#                          skipped: list of unreadable files left out (skip_bad=True)
#   build.json           the settings, written first; lets an interrupted build resume
#   meta.json            written last (complete cache): settings + shard list + count
#
# Shard k holds ImageFolder items [k * shard_size, (k + 1) * shard_size); every shard file is
# written atomically, so a killed build resumes by skipping the shard files that exist.


def _atomic_write_bytes(path: Path, write) -> None:
    """`write(file)` into a temp file renamed onto `path` (dit.checkpoint.write_atomic)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    write_atomic(path, to_file)


def _atomic_write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.pt"


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported cache dtype {dtype!r}: use one of {sorted(_DTYPES)}")
        return dtype
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported cache dtype {dtype}: use one of {sorted(_DTYPES)}")


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


def build_latent_cache(
    dataset_root,
    autoencoder,
    out_dir,
    image_size: int,
    batch_size: int = 32,
    num_workers: int = 4,
    device=None,
    flip: bool = True,
    progress: bool = True,
    dtype="float16",
    shard_size: int = 4096,
    skip_bad: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> Path:
    """Encode every image of an ImageFolder (and, with `flip`, its horizontal mirror) once and
    store the posterior moments in shards under `out_dir`. Returns `out_dir`.

    Why moments and both mirrors: training then draws `latent = (mean + std * eps) * scale` with
    fresh eps each step and picks a mirror at random, which is exactly what the reference's
    on-the-fly pipeline (crop, random flip, VAE posterior sample) computes, at a fraction of the
    cost. Flipping the latent instead would not be equivalent: the VAE is not mirror-symmetric.

    Resumable: rerunning with the same settings skips shards already written. Distributed: with
    torch.distributed initialised (or explicit `rank`/`world_size`), rank r encodes shards
    r, r + W, ...; rank 0 writes `meta.json` after all shards exist.
    `dtype` is the storage dtype of the moments ("float16" halves the size; "float32" is exact).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).expanduser()
    if rank is None or world_size is None:
        rank, world_size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _is_distributed() else (0, 1)
        )
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    images = ImageFolderDataset(dataset_root, image_size, hflip=False, skip_bad=skip_bad)
    latent_side = autoencoder.latent_size(image_size)  # raises if not divisible
    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "autoencoder": autoencoder.to_dict(),
        "image_size": int(image_size),
        "latent_shape": [int(autoencoder.latent_channels), latent_side, latent_side],
        "num_classes": images.num_classes,
        "classes": list(images.classes),
        "num_files": len(images),
        "flip": bool(flip),
        "dtype": _dtype_name(dtype),
        "shard_size": int(shard_size),
    }
    settings = json.loads(json.dumps(settings))  # compare like with like against a stored copy
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, build_path = out_dir / META_FILE, out_dir / BUILD_FILE
    for existing_path in (meta_path, build_path):
        if existing_path.exists():
            existing = json.loads(existing_path.read_text())
            differ = sorted(k for k in settings if existing.get(k) != settings[k])
            if differ:
                raise LatentCacheMismatch(
                    f"{out_dir} already holds a latents cache built with different settings "
                    f"({', '.join(differ)}): choose a new out_dir, or delete the old cache"
                )
    if meta_path.exists():
        return out_dir  # complete already
    if rank == 0:
        _atomic_write_json(build_path, {**settings, "dataset_root": str(Path(dataset_root).expanduser().resolve())})

    num_shards = math.ceil(len(images) / shard_size)
    todo = [k for k in range(rank, num_shards, world_size) if not (out_dir / _shard_name(k)).exists()]
    total = sum(min((k + 1) * shard_size, len(images)) - k * shard_size for k in todo)
    if device is None:
        device = next(iter(autoencoder.parameters()), torch.empty(0)).device
    save_dtype = _DTYPES[settings["dtype"]]

    with tqdm(total=total, desc=f"encoding (rank {rank})", unit="img", disable=not progress) as bar:
        for k in todo:
            shard_indices = list(range(k * shard_size, min((k + 1) * shard_size, len(images))))
            shard = _encode_shard(
                images, shard_indices, autoencoder, device, flip, save_dtype, batch_size, num_workers, bar,
                empty_shape=(0, 2 if flip else 1, *settings["latent_shape"]),
            )
            _atomic_write_bytes(out_dir / _shard_name(k), functools.partial(torch.save, shard))

    if _is_distributed():
        torch.distributed.barrier()  # every rank's shards are written
        if rank == 0:
            _finalize_cache(out_dir, settings, num_shards)
        torch.distributed.barrier()
    elif all((out_dir / _shard_name(k)).exists() for k in range(num_shards)):
        _finalize_cache(out_dir, settings, num_shards)
    else:  # independent processes given rank/world_size: the last one to finish writes meta.json
        warnings.warn(f"rank {rank} done; {out_dir} is complete once every rank has finished", stacklevel=2)
    return out_dir


def _encode_shard(images, shard_indices, autoencoder, device, flip, save_dtype, batch_size, num_workers, bar, empty_shape) -> dict:
    """Encode one shard's images; returns the dict saved as the shard file."""
    loader = DataLoader(
        _CacheItems(images, shard_indices), batch_size=batch_size, num_workers=num_workers,
        shuffle=False, pin_memory=torch.device(device).type == "cuda",
    )
    means, stds, labels, indices, skipped = [], [], [], [], []
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
            means.append(mean.reshape(v, b, *mean.shape[1:]).transpose(0, 1).to("cpu", save_dtype))  # (b, V, C, h, w)
            stds.append(std.reshape(v, b, *std.shape[1:]).transpose(0, 1).to("cpu", save_dtype))
            labels.append(y)
            indices.append(idx)
        bar.update(len(ok))
    if not means:  # every file of this shard was unreadable (and skipped)
        means, stds = [torch.empty(empty_shape, dtype=save_dtype)], [torch.zeros(empty_shape, dtype=save_dtype)]
        labels, indices = [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int64)]
    shard = {
        "mean": torch.cat(means).contiguous(),
        "labels": torch.cat(labels).to(torch.int64),
        "indices": torch.cat(indices).to(torch.int64),
        "skipped": skipped,
    }
    std = torch.cat(stds)
    if std.any():  # the pixel autoencoder is deterministic: no std to store
        shard["std"] = std.contiguous()
    return shard


def _load_shard(path: Path) -> dict:
    # weights_only: a cache file can never run code; mmap: random access without reading it all.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # Same type (callers may catch it), with a message that says what to do.
        raise pickle.UnpicklingError(
            f"latents cache shard {path} holds Python objects other than tensors and is refused: loading it "
            f"could run code ({str(err).splitlines()[0][:200]}). Rebuild the cache from the images"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise LatentCacheMismatch(
            f"latents cache shard {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is truncated "
            f"or corrupt: delete it and {META_FILE}, then rerun the same `python -m dit.cache_latents` command "
            "(it encodes only the missing shard)"
        ) from err


def _finalize_cache(out_dir: Path, settings: dict, num_shards: int) -> None:
    """Check that every shard exists, then write meta.json (the mark of a complete cache)."""
    shards, skipped, count = [], [], 0
    for k in range(num_shards):
        path = out_dir / _shard_name(k)
        if not path.exists():
            raise FileNotFoundError(
                f"latents cache {out_dir} is missing {path.name}: a rank did not finish; "
                "rerun the same command to resume"
            )
        shard = _load_shard(path)
        n = len(shard["labels"])
        shards.append({"file": path.name, "count": n})
        skipped.extend(shard["skipped"])
        count += n
    if count == 0:
        raise BadImageError(f"no readable image: all {len(skipped)} files were skipped; check the data path")
    meta = {**settings, "count": count, "num_skipped": len(skipped), "skipped": skipped, "shards": shards}
    _atomic_write_json(out_dir / META_FILE, meta)
    (out_dir / BUILD_FILE).unlink(missing_ok=True)


class LatentCacheDataset(Dataset):
    """Items of a cache written by `build_latent_cache`: (latent (C, h, w) float32, already
    multiplied by the autoencoder's scale, int label).

    Each item draws, from `item_seed(seed, epoch, index)`, first a coin for the mirror (used when
    `hflip`) and then eps ~ N(0, I) for the posterior sample `(mean + std * eps) * scale` (used
    when `sample_posterior`; otherwise the latent is `mean * scale`). `noise_for(index)` returns
    exactly those draws. Call `set_epoch(e)` before each epoch (see ImageFolderDataset). With
    the same seed, item i of epoch e uses the same mirror as ImageFolderDataset's item i, so the
    two pipelines differ only in the posterior noise.
    """

    def __init__(self, path, hflip: bool = True, sample_posterior: bool = True, seed: int = 0):
        self.path = Path(path).expanduser()
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            if (self.path / BUILD_FILE).exists():
                raise FileNotFoundError(
                    f"latents cache {self.path} is incomplete (no {META_FILE}): its build was "
                    "interrupted; rerun the same `python -m dit.cache_latents` command to resume it"
                )
            raise FileNotFoundError(
                f"no latents cache at {self.path} ({META_FILE} not found): build one with "
                "`python -m dit.cache_latents data_path=IMAGEFOLDER out_dir=DIR vae=...`"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise LatentCacheMismatch(
                f"latents cache {self.path} has format version {meta.get('format_version')}, this code "
                f"reads version {CACHE_FORMAT_VERSION}: rebuild the cache"
            )
        if hflip and not meta["flip"]:
            raise LatentCacheMismatch(
                f"latents cache {self.path} was built without mirrored images, so it cannot provide "
                "horizontal flips: rebuild it with flip=true, or train with hflip disabled"
            )
        self.meta = meta
        self.hflip = hflip
        self.sample_posterior = sample_posterior
        self.seed = int(seed)
        self.epoch = 0
        self.latent_shape = tuple(meta["latent_shape"])
        self.classes = list(meta["classes"])
        self.num_classes = int(meta["num_classes"])
        self.autoencoder_spec = dict(meta["autoencoder"])
        self.scale_factor = float(self.autoencoder_spec["scale_factor"])
        shards = [s for s in meta["shards"] if s["count"] > 0]
        self._files = [self.path / s["file"] for s in shards]
        self._starts = np.cumsum([0] + [s["count"] for s in shards]).tolist()  # item offsets of shards
        self._shards: dict[int, dict] = {}

    def __getstate__(self):
        # DataLoader workers reopen the shards themselves (mmap is cheap), not pickle them.
        return {**self.__dict__, "_shards": {}}

    def __len__(self) -> int:
        return self._starts[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self, k: int) -> dict:
        if k not in self._shards:
            path = self._files[k]
            if not path.exists():
                raise FileNotFoundError(f"latents cache shard {path} is missing: rebuild the cache")
            shard = _load_shard(path)
            expected = (self._starts[k + 1] - self._starts[k], 2 if self.meta["flip"] else 1, *self.latent_shape)
            if tuple(shard["mean"].shape) != expected:
                raise LatentCacheMismatch(
                    f"latents cache shard {path} holds shape {tuple(shard['mean'].shape)}, "
                    f"{META_FILE} says {expected}: the cache is corrupt; rebuild it"
                )
            self._shards[k] = shard
        return self._shards[k]

    def noise_for(self, index: int) -> tuple[bool, torch.Tensor]:
        """The mirror choice and posterior noise eps (C, h, w) that item `index` uses this epoch."""
        g = item_generator(self.seed, self.epoch, index)
        flip = _draw_flip(g) and self.hflip
        eps = torch.randn(self.latent_shape, generator=g)
        return flip, eps

    def moments(self, index: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, std) of item `index` (its mirror with `flip`), float32."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latents cache of {len(self)} items")
        k = bisect_right(self._starts, index) - 1
        shard, i = self._shard(k), index - self._starts[k]
        view = 1 if flip else 0
        mean = shard["mean"][i, view].float()
        std = shard["std"][i, view].float() if "std" in shard else torch.zeros_like(mean)
        return mean, std

    def label(self, index: int) -> int:
        k = bisect_right(self._starts, index) - 1
        return int(self._shard(k)["labels"][index - self._starts[k]])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip, eps = self.noise_for(index)
        mean, std = self.moments(index, flip)
        latent = mean + std * eps if self.sample_posterior else mean
        return latent * self.scale_factor, self.label(index)

    def check_compatible(self, latent_channels: int, latent_size: int, num_classes: int | None = None,
                         autoencoder_spec: dict | None = None) -> None:
        """Raise LatentCacheMismatch, before any training, if the model expects other latents."""
        expected = (int(latent_channels), int(latent_size), int(latent_size))
        if tuple(self.latent_shape) != expected:
            raise LatentCacheMismatch(
                f"latents cache {self.path} holds latents of shape {self.latent_shape} (C, H, W) but the "
                f"model expects {expected}: set the model's in_channels/input size to match the cache "
                f"(image size {self.meta['image_size']}, autoencoder {self.autoencoder_spec['name']}), "
                "or rebuild the cache for this model"
            )
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise LatentCacheMismatch(
                f"latents cache {self.path} has {self.num_classes} classes but the model has {num_classes}: "
                "take num_classes from the data"
            )
        if autoencoder_spec is not None:
            differ = sorted(k for k in ("name", "latent_channels", "downsample_factor", "scale_factor")
                            if k in autoencoder_spec and autoencoder_spec[k] != self.autoencoder_spec.get(k))
            if differ:
                raise LatentCacheMismatch(
                    f"latents cache {self.path} was made with autoencoder {self.autoencoder_spec}, which "
                    f"differs from the configured one in {', '.join(differ)}: use the same vae or rebuild the cache"
                )


# --------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------


class DistributedResumableSampler(Sampler[int]):
    """The data order of one epoch, split across ranks, resumable mid-epoch.

    Epoch e's global order is a permutation of range(dataset_len) drawn from `seed + e` (or
    0..N-1 without shuffle), trimmed (drop_last) or wrapped around (otherwise) to a multiple of
    `num_replicas`. Rank r takes global positions r, r + W, r + 2W, ... (as torch's
    DistributedSampler). `start_index` is the number of positions of the global order already
    consumed (all ranks together, i.e. steps done this epoch x global batch): a resumed run sets
    it and gets exactly the remaining order, even with a different number of ranks.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if dataset_len <= 0:
            raise ValueError(f"cannot sample from an empty dataset (dataset_len={dataset_len})")
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(
                f"dataset of {dataset_len} items is smaller than the {num_replicas} ranks: "
                "use fewer ranks or drop_last=False"
            )
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        per_rank = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        self.total_size = per_rank * num_replicas
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.total_size:
            raise ValueError(f"start_index {start_index} is outside the epoch's {self.total_size} positions")
        if start_index % self.num_replicas:
            raise ValueError(
                f"start_index {start_index} is not a multiple of num_replicas {self.num_replicas}: "
                "ranks would get different numbers of samples; pass steps x global batch size"
            )
        self.epoch, self.start_index = int(epoch), int(start_index)

    def global_order(self) -> torch.Tensor:
        """The epoch's full order over all ranks, (total_size,) int64."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_len)
        if self.total_size > self.dataset_len:  # wrap around so every rank gets as many
            order = order.repeat(math.ceil(self.total_size / self.dataset_len))
        return order[: self.total_size]

    def __iter__(self):
        return iter(self.global_order()[self.start_index + self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.total_size - self.start_index) // self.num_replicas
