"""File formats below sampling and metrics: atomic writes, ADM `.npz` sample files (written
streaming, read without unpickling), folders of images, PNG grids, the pixel conversion, and
the errors of checkpoint files that cannot be read or written (raised by dit.io.checkpoint).

Images everywhere are uint8 (N, H, W, 3) numpy arrays (contract 3 in docs/design.md).

Atomic writes go to a temp file in the same directory, are fsynced, then renamed over the
target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class CheckpointError(RuntimeError):
    """A file that is not a usable checkpoint (corrupt, wrong kind, missing pieces)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects beyond tensors and containers; it is not loaded."""


class CheckpointMismatchError(CheckpointError):
    """The weights in the file do not fit the requested model (keys or shapes differ)."""


class CheckpointWriteError(CheckpointError):
    """A file could not be written (disk full, quota, permissions, I/O error). Nothing was
    written under its name: a file already there is unchanged. `errno` is the OS error number."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


class FileWriteError(OSError):
    """A file could not be written (disk full, quota, permissions, I/O error). `errno`, `strerror`
    and `filename` are the OS error's; the message names the file and what to do. Nothing was
    written under that name: a file already there is unchanged."""

    def __init__(self, path: str | os.PathLike, cause: OSError,
                 kept: str = "Nothing was written under that name (a file already there is unchanged)"):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.kept = kept

    def __str__(self) -> str:
        reason = f"{self.strerror} (errno {self.errno})" if self.errno else self.strerror
        return (f"could not write {self.filename}: {reason}. {self.kept}: free space or fix permissions on "
                f"{Path(self.filename).parent}, then rerun")


def atomic_target(path: str | os.PathLike) -> Path:
    """Where an atomic write of `path` goes: the file a symlink points to (the link stays a link,
    e.g. a results file kept on a bigger disk), else `path`. Anything there but a regular file (a
    directory, a device, a FIFO) is refused rather than replaced."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists() and not target.is_file():
        kind = "a directory" if target.is_dir() else "not a regular file (a device, FIFO or socket)"
        via = f" (the target of the link {path})" if target != path else ""
        raise FileExistsError(f"refusing to write {target}{via}: it exists and is {kind}; choose another path")
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_path)` for a temp file beside `path`, fsync it, rename it onto `path`.

    The temp file lives in the same directory so that `os.replace` is a rename within one
    filesystem (atomic on POSIX). On any failure the temp file is removed and `path` keeps
    its previous content; an OSError becomes a `FileWriteError` naming `path`. A symlink at
    `path` is written through (`atomic_target`); returns `path` as given.
    """
    given = Path(path)
    path = atomic_target(given)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, FileWriteError):
            raise
        raise FileWriteError(given, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the directory entry); not possible on every OS/filesystem.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return given
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return given


class RecordingFile:
    """A file wrapper that remembers the OSError of a failed write: torch's zip writer replaces it
    by an opaque "unexpected pos" RuntimeError, and the real reason is what the user needs."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def read_json_file(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in `path`; a truncated or corrupt file raises ValueError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it is truncated or corrupt; {fix}") from err


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, CSV, logs) through `write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: dict) -> Path:
    """A settings/record JSON file: indented, keys sorted, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in ~[-1, 1] -> (N, H, W, 3) uint8, as the reference converts samples:
    clamp(127.5 x + 128, 0, 255), then truncation (contract 3)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoded images (N, 3, H, W), got shape {tuple(images.shape)}")
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


# PIL modes of 16-bit (and 32-bit integer) single-channel images, e.g. a 16-bit greyscale PNG.
# PIL's own convert("RGB") clips them at 255, so almost every pixel becomes white.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_to_rgb(image, name: str | os.PathLike = "image"):
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes I;16*, and I as 16-bit PNGs decode) is
    scaled to 8 bits (v * 255 / 65535, rounded: exact for 8-bit values stored as v * 257) rather
    than clipped; values outside 0..65535 or float images are refused, naming the file."""
    from PIL import Image

    if image.mode in WIDE_GREY_MODES:
        wide = np.asarray(image).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"{name}: {image.mode} image with values {wide.min()}..{wide.max()}, outside the 16-bit "
                             "range 0..65535: convert it to an 8-bit RGB PNG or JPEG first")
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError(f"{name}: floating-point image (mode F) has no defined 0..255 range: convert it to "
                         "an 8-bit RGB PNG or JPEG first")
    return image.convert("RGB")


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """Validate uint8 (N, H, W, 3) images (numpy or torch); return them as a numpy array."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"{what} must be uint8 (N, H, W, 3) in 0..255, got dtype {arr.dtype}: convert samples in [-1, 1] "
            "with dit.sampling.to_uint8"
        )
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be shaped (N, H, W, 3) (channels last), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------
# .npz files (the ADM sample format, shards, statistics)
# --------------------------------------------------------------------------------------


@dataclass
class StreamedArray:
    """An array written to an `.npz` chunk by chunk (C order along the first axis), so files
    larger than memory can be assembled: 50 000 samples at 512x512 are 39 GB."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Iterable[np.ndarray]


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray | StreamedArray]) -> Path:
    """Write an `.npz` that `np.load` reads, byte-for-byte reproducibly (fixed zip timestamps,
    unlike `np.savez`, which stamps the current time) and atomically (temp file + os.replace).
    Values are arrays or `StreamedArray`s. A failed write raises `FileWriteError` naming `path`."""
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                if not isinstance(value, StreamedArray):
                    value = np.asarray(value)
                    if value.dtype == object:
                        raise TypeError(f"{key}: object arrays would need pickle; store plain arrays")
                    value = StreamedArray(value.shape, value.dtype, [value])
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)), "fortran_order": False,
                              "shape": tuple(int(d) for d in value.shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    rows = 0
                    for chunk in value.chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=value.dtype)
                        if chunk.shape[1:] != tuple(value.shape[1:]):
                            raise ValueError(f"{key}: chunk shaped {chunk.shape} does not fit {value.shape}")
                        f.write(chunk.tobytes())
                        rows += len(chunk) if chunk.ndim else 1
                    if rows != (value.shape[0] if len(value.shape) else 1):
                        raise ValueError(f"{key}: wrote {rows} rows, expected {value.shape[0] if value.shape else 1}")

    return write_atomic(path, write)


def write_samples_npz(path: str | os.PathLike, images: Any, labels: Any | None = None) -> Path:
    """The ADM evaluator format: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels (N,) when known."""
    images = check_images(images, "samples")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels shaped {labels.shape}")
        arrays["arr_1"] = labels
    return write_npz_atomic(path, arrays)


def open_npz(path: str | os.PathLike):
    """`np.load` of an `.npz` that never unpickles objects from a foreign file; a file that is
    not an `.npz` raises ValueError saying so. Use as a context manager."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} as an .npz file ({err}): is it truncated or not an .npz?") from err


def read_npz_array(data, key: str, path: str | os.PathLike) -> np.ndarray:
    """`data[key]` of an `open_npz` file; a pickled object array is refused with a clear message."""
    try:
        return data[key]
    except ValueError as err:  # e.g. a pickled object array, refused because allow_pickle=False
        raise ValueError(f"{path}: cannot read {key!r} without unpickling ({err}); only plain arrays are accepted") from err


def npz_array_shape(path: str | os.PathLike, key: str) -> tuple[int, ...]:
    """Shape of one array of an `.npz` from its header, without reading the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return tuple(shape)


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels (N,) or None) from an ADM-format `.npz`."""
    path = Path(path)
    with open_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no images (key 'arr_0'; keys: {data.files}): not an ADM sample batch")
        images = check_images(read_npz_array(data, "arr_0", path), f"{path}: arr_0")
        labels = read_npz_array(data, "arr_1", path) if "arr_1" in data.files else None
    if labels is not None and labels.shape != (len(images),):
        labels = None  # not per-image labels
    return images, labels


# --------------------------------------------------------------------------------------
# Image folders and grids
# --------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """All images under `folder` (recursively, sorted by path) as uint8 (N, H, W, 3). They must share
    one size: FID compares images at the resolution they were generated or prepared at."""
    from PIL import Image

    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = []
    for f in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 1000):
        try:
            with Image.open(f) as im:
                images.append(np.asarray(image_to_rgb(im, f)))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {f}: {err}") from err
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{f} is {images[-1].shape[:2]} but {files[0]} is {images[0].shape[:2]}: "
                             "resize/crop the folder to one size first")
    return np.stack(images)


def read_images(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels where stored) from an ADM `.npz` or a folder of image files."""
    source = Path(source).expanduser()
    if source.is_dir():
        return read_image_folder(source), None
    if source.is_file():
        return read_samples_npz(source)
    raise FileNotFoundError(f"{source} is neither an .npz file nor a folder of images")


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 4, padding: int = 2) -> Path:
    """uint8 (N, H, W, 3) -> one PNG, `nrow` images per row, written atomically."""
    from PIL import Image

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
