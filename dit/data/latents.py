"""The latents cache on disk, and `LatentCacheDataset`, its reader.

    ds = LatentCacheDataset("cache/in256")   # (4, 32, 32) scaled latent, label

A cache holds each image's posterior moments (and its mirror's), written once by
`build_latent_cache` (dit/data/cache.py, `python -m dit.cache_latents`). Each item draws its mirror
and its posterior noise from `item_seed(seed, epoch, index)` (dit/data/seeds.py), so an epoch's
latents do not depend on the DataLoader workers and a resumed run sees the same ones.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dit.autoencoder import LatentTransform
from dit.data.seeds import draw_flip, item_generator
from dit.io.atomic import read_json_file

# --------------------------------------------------------------------------------------
# The format. Layout of a cache directory:
#   shard_00000.pt ...   torch.save dicts (weights_only-loadable, read with mmap):
#                          mean  (n, V, C, h, w)  posterior mean, unscaled; V = 2 with flips
#                                                 (view 0 the image, view 1 its mirror), else 1
#                          std   (n, V, C, h, w)  posterior std, unscaled (absent when all zero,
#                                                 as for the pixel autoencoder)
#                          repa  (n, V, T', E)  REPA encoder patch tokens of the same views (only
#                                                 in caches built with repa_encoder=; meta.json's
#                                                 `repa`: encoder name, resolution, dim, num_tokens, dtype)
#                          labels (n,) int64, indices (n,) int64 (ImageFolder index),
#                          skipped: list of unreadable files left out (skip_bad=True)
#   build.json           the settings, written first; lets an interrupted build resume
#   meta.json            written last (complete cache): settings + shard list + count; each
#                        shard entry: file, count, and (caches built since issue 21) bytes and
#                        sha256, the SHA-256 of the shard file, checked when the cache is opened
#
# Shard k holds ImageFolder items [k * shard_size, (k + 1) * shard_size); every shard file is
# written atomically, so a killed build resumes by skipping the shard files that exist.
#
# Why a digest of the shard files: the data identity a checkpoint records for a cache is a hash of
# meta.json (dit/train/stream.py data_identity), and two caches of different images (the same
# folder with inverted colours) have equal metadata. With the digests in meta.json, their
# identities differ, and shards swapped under a meta.json are refused. A cache written before the
# digests (no `sha256` in its shard entries) still opens, with the identity it always had.
# --------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"  # written last: its presence means the cache is complete
BUILD_FILE = "build.json"  # the settings of a cache being built, for resuming


class LatentCacheMismatch(ValueError):
    """A latents cache that does not fit the model or the requested settings."""


def shard_name(k: int) -> str:
    """The file name of shard `k`."""
    return f"shard_{k:05d}.pt"


def load_shard(path: Path) -> dict:
    """One shard file's dict (see the layout above); refuses files that could run code."""
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


_DIGEST_CHUNK = 8 << 20  # bytes per hash update


def shard_digest(path: Path) -> str:
    """The SHA-256 (hex) of a shard file's bytes, as meta.json records it. SHA-256: hashlib's
    runs at about 1.6 GB/s per core where the CPU has SHA instructions, and it releases the GIL, so
    shards hash in parallel threads (benchmarks/README.md, "Latents cache fingerprint"). Through
    mmap: the page cache is hashed in place, about 20 % faster than copying it out with reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)  # a cold file: read ahead
            view = memoryview(mapped)
            try:
                for start in range(0, len(view), _DIGEST_CHUNK):
                    h.update(view[start:start + _DIGEST_CHUNK])
            finally:
                view.release()  # before the mmap closes (it refuses while a view exists)
    return h.hexdigest()


_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The bits of a 16-bit float's magnitude (all but the sign) and its exponent's: a value whose
# magnitude bits reach the exponent mask has an all-ones exponent, i.e. it is inf or NaN.
_HALF_EXPONENT = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
_VALUE_CHUNK = 1 << 25  # elements per pass of the value checks: bounded temporaries for large shards


def _nonfinite_or_negative(t: torch.Tensor, nonnegative: bool) -> str | None:
    """What is wrong with the values of a float tensor ("NaN/inf values", "negative values"), or
    None. Why not torch.isfinite: on CPU it reads half tensors at ~0.05 GB/s and float32 at
    ~0.5 GB/s; a float32 sum (NaN and inf propagate; only an overflow of finite values needs the
    exact check) and a bit test of 16-bit floats run at memory speed, so a start-up check of every
    shard costs a fraction of its digest."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _VALUE_CHUNK):
        part = flat[start:start + _VALUE_CHUNK]
        if part.dtype in _HALF_EXPONENT:
            mask, bits = _HALF_EXPONENT[part.dtype], part.view(torch.int16)
            if nonnegative:  # finite and >= 0 is, as int16, exactly 0 <= bits < mask: one pass, no temporary
                low, high = torch.aminmax(bits)
                if int(high) < mask and int(low) >= 0:
                    continue
            if int((bits & 0x7FFF).max()) >= mask:
                return "NaN/inf values"
            if nonnegative and bool((part < 0).any()):  # -0.0 has the sign bit set but is no negative value
                return "negative values"
        else:
            if not torch.isfinite(part.sum()) and not torch.isfinite(part).all():
                return "NaN/inf values"
            if nonnegative and bool((part < 0).any()):
                return "negative values"
    return None


def shard_problems(shard, meta: dict, count: int | None = None, values: bool = True) -> list[str]:
    """What is wrong with a loaded shard against the cache's `meta` (meta.json, or the settings
    of a cache being built): the arrays and their shapes (`count` items, None: as many as its
    labels), dtypes, labels in 0..num_classes-1, indices in 0..num_files-1, and with `values` its
    float arrays finite and its std >= 0 (a full pass over them). An empty list: the shard fits.

    Why every array: a shard whose `std` has another shape broadcasts (items in -16..16 instead
    of about -1..1), and a label of num_classes is the null class of classifier-free guidance;
    both trained silently before these checks."""
    if not isinstance(shard, dict):
        return [f"holds a {type(shard).__name__}, not the dict of arrays a shard is"]
    arrays = ("mean", "labels", "indices", *(k for k in ("std", "repa") if k in shard))
    missing = [k for k in ("mean", "labels", "indices") if k not in shard]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    wrong = [k for k in arrays if not isinstance(shard[k], torch.Tensor)]
    if wrong:
        return [f"holds {', '.join(wrong)} that are not tensors"]
    n = count if count is not None else (len(shard["labels"]) if shard["labels"].dim() == 1 else -1)
    views = 2 if meta["flip"] else 1
    latent = (n, views, *meta["latent_shape"])
    want = {  # name: (shape, dtype)
        "mean": (latent, _STORAGE_DTYPES.get(meta.get("mean_dtype", meta["dtype"]))),  # older caches: in `dtype`
        "std": (latent, _STORAGE_DTYPES.get(meta["dtype"])),
        "labels": ((n,), torch.int64),
        "indices": ((n,), torch.int64),
    }
    if "repa" in meta:
        spec = meta["repa"]
        # a record without a dtype (none known, but REPA caches predate some checks): any float dtype
        want["repa"] = ((n, views, spec["num_tokens"], spec["dim"]), _STORAGE_DTYPES.get(spec.get("dtype")))
    problems = []
    for name in arrays:
        if name not in want:
            problems.append(f"holds {name}, which a cache without REPA features has not")
            continue
        shape, dtype = want[name]
        t = shard[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != (dtype or (t.dtype if t.is_floating_point() else None)):
            problems.append(f"holds {name} of shape {tuple(t.shape)} {t.dtype}, {META_FILE} says {tuple(shape)} {dtype}")
    if problems:
        return problems
    labels, indices = shard["labels"], shard["indices"]
    num_classes = int(meta["num_classes"])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        problems.append(f"holds labels outside 0..{num_classes - 1} (e.g. {int(bad[0])}; {num_classes} is the null "
                        "class of classifier-free guidance)")
    if n and "num_files" in meta and (int(indices.min()) < 0 or int(indices.max()) >= int(meta["num_files"])):
        problems.append(f"holds image indices outside 0..{int(meta['num_files']) - 1}")
    if values:
        for name in ("mean", "std", "repa"):
            if name in shard:
                bad = _nonfinite_or_negative(shard[name], nonnegative=name == "std")
                if bad:
                    problems.append(f"holds {bad} in {name}")
    return problems


class LatentCacheDataset(Dataset):
    """Items of a cache written by `build_latent_cache`: (latent (C, h, w) float32, already
    through the autoencoder's latent transform (`z * scale` for SD's VAE), int label).

    Each item draws, from `item_seed(seed, epoch, index)`, first a coin for the mirror (used when
    `hflip`) and then eps ~ N(0, I) for the posterior sample `(mean + std * eps) * scale` (used
    when `sample_posterior`; otherwise the latent is `mean * scale`). `noise_for(index)` returns
    exactly those draws. Call `set_epoch(e)` before each epoch (see ImageFolderDataset). With
    the same seed, item i of epoch e uses the same mirror as ImageFolderDataset's item i, so the
    two pipelines differ only in the posterior noise.

    With `repa_features`, items are (latent, label, features (T', E) float32): the REPA encoder's
    tokens of the same view (image or mirror) as the latent; `repa_spec` is meta.json's record.
    """

    def __init__(self, path, hflip: bool = True, sample_posterior: bool = True, seed: int = 0,
                 repa_features: bool = False):
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
                "`python -m dit.cache_latents data_root=IMAGEFOLDER out_dir=DIR vae=...`"
            )
        meta = read_json_file(meta_path, f"delete it and rerun the `python -m dit.cache_latents` command that built "
                                          f"{self.path}: its shards are reused and {META_FILE} is rewritten")
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
        if repa_features and "repa" not in meta:
            raise LatentCacheMismatch(
                f"latents cache {self.path} holds no REPA encoder features: rebuild it with "
                "`python -m dit.cache_latents ... repa_encoder=NAME` (a new out_dir), or train with the encoder "
                "on the fly (data from images)"
            )
        self.repa_features = bool(repa_features)
        self.repa_spec = dict(meta["repa"]) if "repa" in meta else None
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
        self.transform = LatentTransform.from_spec(self.autoencoder_spec)  # z -> model latents
        shards = [s for s in meta["shards"] if s["count"] > 0]
        self._files = [self.path / s["file"] for s in shards]
        self._starts = np.cumsum([0] + [s["count"] for s in shards]).tolist()  # item offsets of shards
        self._shards: dict[int, dict] = {}
        self._verify(shards)

    def _verify(self, entries: list[dict]) -> None:
        """LatentCacheMismatch, at start-up (before any training), naming every shard that is not
        the file meta.json recorded when the cache was built (its size, then the SHA-256 of its
        bytes: a full read) or whose arrays do not fit meta.json (`shard_problems`: shapes, dtypes,
        label range, finite values). Shards in parallel threads: hashlib and torch release the GIL.
        A cache built before the digests existed records none: only its arrays are checked."""

        def check(k: int) -> str | None:
            path, entry = self._files[k], entries[k]
            if not path.exists():
                raise FileNotFoundError(f"latents cache shard {path} is missing: rebuild the cache")
            shard = load_shard(path)  # first: a file of pickled objects is refused as such (UnpicklingError)
            if "sha256" in entry:
                size = path.stat().st_size
                if size != entry.get("bytes", size):  # a different size: no need to read it
                    return f"{path.name} ({size} bytes, {META_FILE} records {entry['bytes']})"
                if shard_digest(path) != entry["sha256"]:
                    return f"{path.name} (its SHA-256 differs from the one {META_FILE} records)"
            # The arrays, whether or not a digest vouches for them: a cache built with digests by
            # other code, or one without them, may still hold arrays that do not fit.
            problems = shard_problems(shard, self.meta, entry["count"])
            return f"{path.name} ({'; '.join(problems)})" if problems else None

        threads = max(1, min(len(self._files), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(threads) as pool:
            changed = [bad for bad in pool.map(check, range(len(self._files))) if bad]
        if changed:
            raise LatentCacheMismatch(
                f"latents cache {self.path} holds shards that are not the files it was built with, or arrays "
                f"that do not fit its {META_FILE}: "
                f"{'; '.join(changed[:5])}{f'; and {len(changed) - 5} more' if len(changed) > 5 else ''}. "
                f"They were replaced or changed after the build (another cache's shards, a bad copy): "
                f"rebuild the cache, or delete those shards and {META_FILE} and rerun the "
                "`python -m dit.cache_latents` command that built it (it encodes only the missing shards)"
            )

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
            shard = load_shard(path)
            # Again when opened (each DataLoader worker opens its own): the file may have changed
            # since start-up. Shapes, dtypes and labels only: the values' full pass was made then.
            problems = shard_problems(shard, self.meta, self._starts[k + 1] - self._starts[k], values=False)
            if self.repa_features and isinstance(shard, dict) and "repa" not in shard:
                problems.append("lacks the REPA features its meta.json records")
            if problems:
                raise LatentCacheMismatch(f"latents cache shard {path} {'; '.join(problems)}: the cache is corrupt "
                                          "or was changed after it was built; rebuild it")
            self._shards[k] = shard
        return self._shards[k]

    def noise_for(self, index: int) -> tuple[bool, torch.Tensor]:
        """The mirror choice and posterior noise eps (C, h, w) that item `index` uses this epoch."""
        g = item_generator(self.seed, self.epoch, index)
        flip = draw_flip(g) and self.hflip
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

    def features(self, index: int, flip: bool = False) -> torch.Tensor:
        """REPA encoder tokens (T', E) of item `index` (its mirror with `flip`), float32."""
        if self.repa_spec is None:
            raise LatentCacheMismatch(f"latents cache {self.path} holds no REPA encoder features")
        k = bisect_right(self._starts, index) - 1
        return self._shard(k)["repa"][index - self._starts[k], 1 if flip else 0].float()

    def label(self, index: int) -> int:
        k = bisect_right(self._starts, index) - 1
        return int(self._shard(k)["labels"][index - self._starts[k]])

    def __getitem__(self, index: int) -> tuple:
        flip, eps = self.noise_for(index)
        mean, std = self.moments(index, flip)
        latent = mean + std * eps if self.sample_posterior else mean
        if self.repa_features:
            return self.transform.apply(latent), self.label(index), self.features(index, flip)
        return self.transform.apply(latent), self.label(index)

    def use_repa_features(self, encoder_name: str, resolution: int) -> dict:
        """From now on items are (latent, label, features): checked against the training config's
        encoder (LatentCacheMismatch naming both when they differ). Returns meta.json's record."""
        if self.repa_spec is None:
            raise LatentCacheMismatch(
                f"latents cache {self.path} holds no REPA encoder features: rebuild it with "
                "`python -m dit.cache_latents ... repa_encoder=NAME` (a new out_dir), or train with the encoder "
                "on the fly (data from images)"
            )
        self.check_repa(encoder_name, resolution)
        self.repa_features = True
        self._shards.clear()  # loaded again with their features checked
        return dict(self.repa_spec)

    def check_repa(self, encoder_name: str, resolution: int) -> None:
        """Raise LatentCacheMismatch unless the cached features come from this encoder setting."""
        spec = self.repa_spec or {}
        if not same_autoencoder_name(spec.get("name", ""), encoder_name) or spec.get("resolution") != int(resolution):
            raise LatentCacheMismatch(
                f"latents cache {self.path} holds REPA features of encoder {spec.get('name')!r} at "
                f"{spec.get('resolution')} px, the config asks for {encoder_name!r} at {resolution} px: set "
                "repa.encoder / repa.resolution to the cache's, or rebuild the cache"
            )

    def check_compatible(self, latent_channels: int | None = None, latent_size: int | None = None,
                         num_classes: int | None = None, autoencoder_spec: dict | None = None,
                         patch_size: int | None = None) -> None:
        """Raise LatentCacheMismatch, before any training, if the model or the configured
        autoencoder expects other latents. Only what is given is checked:

        latent_channels, latent_size: the model's input (C, size, size);
        num_classes: the model's class count;
        autoencoder_spec: keys of `Autoencoder.to_dict()` (name, latent_channels,
            downsample_factor, scale_factor); only the keys present are compared, and names of
            local directories are compared as paths ("./vae" and "/abs/vae" agree);
        patch_size: must divide the cached latent side.
        """
        if latent_channels is not None or latent_size is not None:
            c, h, w = self.latent_shape
            expected = (
                c if latent_channels is None else int(latent_channels),
                h if latent_size is None else int(latent_size),
                w if latent_size is None else int(latent_size),
            )
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
                            if k in autoencoder_spec and not self._same(k, autoencoder_spec[k]))
            if differ:
                listed = ", ".join(f"{k} (cache {self.autoencoder_spec.get(k)!r}, configured {autoencoder_spec[k]!r})"
                                   for k in differ)
                name = self.autoencoder_spec.get("name")
                hint = f" (vae.name={name}; vae=local vae.name=DIR for a directory)" if "name" in differ else ""
                raise LatentCacheMismatch(
                    f"latents cache {self.path} was made with autoencoder {self.autoencoder_spec}, which "
                    f"differs from the configured one in {listed}: use the same vae{hint} or rebuild the cache"
                )
        if patch_size is not None:
            side = self.latent_shape[-1]
            if side % int(patch_size):
                raise LatentCacheMismatch(
                    f"the latents cache {self.path} holds {side}x{side} latents (images {self.meta['image_size']}), "
                    f"which model.patch_size={patch_size} does not divide: use a smaller patch size"
                )

    def _same(self, key: str, value) -> bool:
        """The cache's autoencoder has `value` for `key` (names: local directories as paths)."""
        mine = self.autoencoder_spec.get(key)
        if key == "name" and isinstance(value, (str, os.PathLike)) and isinstance(mine, str):
            return same_autoencoder_name(mine, value)
        return mine == value


def same_autoencoder_name(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Two autoencoder names denote the same one: equal strings (hub ids, "pixel"), or local
    directories that resolve to the same path."""
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
