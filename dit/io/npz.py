"""ADM `.npz` sample files (and the shards and statistics stored the same way): written streaming
and atomically, byte for byte reproducibly, and read without unpickling.

    write_samples_npz("samples.npz", images, labels)   # arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,)
    images, labels = read_samples_npz("samples.npz")
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from dit.io.atomic import write_atomic
from dit.io.images import check_images, read_image_folder


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


def npz_member_shape(path: str | os.PathLike, key: str) -> tuple[int, ...]:
    """The shape one member's `.npy` header claims, checked against what the member holds: a
    header claiming more data than its member has (10^12 labels in a small file) would otherwise
    end in a MemoryError, or an allocation of that size, when numpy reads it."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                header_len = f.tell()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read the header of {key!r} ({err}): is the file truncated or not an "
                         ".npz?") from err
    if not dtype.hasobject:  # object arrays are refused when read, with their own message
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if claimed != info.file_size - header_len:
            raise ValueError(f"{path}: the header of {key!r} claims {tuple(shape)} {dtype} ({claimed} bytes) but the "
                             f"member holds {info.file_size - header_len} bytes: the file is corrupt or crafted; "
                             "write it again with np.savez")
    return tuple(int(d) for d in shape)


def read_npz_array(data, key: str, path: str | os.PathLike) -> np.ndarray:
    """`data[key]` of an `open_npz` file, its header checked first (`npz_member_shape`); a pickled
    object array is refused with a clear message."""
    npz_member_shape(path, key)
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
        labels = read_npz_labels(data, path, len(images))
    return images, labels


def read_npz_labels(data, path: str | os.PathLike, num_images: int) -> np.ndarray | None:
    """`arr_1` of an ADM `.npz` when it holds one label per image, else None (not per-image
    labels), decided from its header: a member claiming more (a few MB that inflate to GBs) is
    never decompressed."""
    if "arr_1" not in data.files or npz_member_shape(path, "arr_1") != (num_images,):
        return None
    return read_npz_array(data, "arr_1", path)


def read_images(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels where stored) from an ADM `.npz` or a folder of image files."""
    source = Path(source).expanduser()
    if source.is_dir():
        return read_image_folder(source), None
    if source.is_file():
        return read_samples_npz(source)
    raise FileNotFoundError(f"{source} is neither an .npz file nor a folder of images")
