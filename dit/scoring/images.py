"""Images read batch by batch, so scoring N samples never holds all N in memory (50 000 samples
of an ADM `.npz` are 10 GB at 256 px and 39 GB at 512).

An image source has `shape` (N, H, W, 3), `len()`, and `read(start, stop)` (also `source[a:b]`),
which returns those images as a fresh uint8 array: only that slice is read from disk.

- `NpzImages`: `arr_0` of an ADM `.npz`. Its `.npy` header is parsed first (uint8, 4-D,
  channels last, C order: checked before any pixel is read; nothing is ever unpickled). A
  member stored uncompressed (what `np.savez` and `dit.io.npz.write_npz_atomic` write) is read
  by seek + read of the slice's bytes; a compressed one (`np.savez_compressed`) is decompressed
  sequentially, restarting from the member's start only when asked for an earlier slice.
- `FolderImages`: a folder of image files (recursive, sorted by path), each read when its batch is.
- `ArrayImages`: an array already in memory (slices are views).

Plain file reads rather than `np.load(mmap_mode=...)`: the page cache of a file read this way is
not resident memory of the process, and `np.load` cannot map a member of a zip archive anyway.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from dit.io.images import IMAGE_SUFFIXES, ImageTooLargeError, check_images, image_files, read_rgb
from dit.io.npz import open_npz, read_npz_labels

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header (30 bytes)
_LOCAL_SIGNATURE = b"PK\x03\x04"


class ImageSource:
    """uint8 (N, H, W, 3) images read in slices. Subclasses implement `read`."""

    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"{type(self).__name__} reads contiguous slices (source[a:b]), got {index!r}")
        start, stop, _ = index.indices(len(self))
        return self.read(start, max(start, stop))

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive slices of `batch_size` images (the last may be shorter)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.read(start, min(start + batch_size, len(self)))

    def close(self) -> None:
        """Release open files (sources open them lazily; reading again reopens)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"images {start}:{stop} out of range for {len(self)} images")


class ArrayImages(ImageSource):
    """Images already in memory (numpy or torch uint8 (N, H, W, 3))."""

    def __init__(self, images, what: str = "images"):
        self.images = check_images(images, what)
        self.shape = tuple(int(d) for d in self.images.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        return self.images[start:stop]


class NpzImages(ImageSource):
    """`key` (default `arr_0`, the ADM sample format) of an `.npz`, read slice by slice."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        self._stream = None  # compressed members: (zip file, member stream, next image index)
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if f"{key}.npy" not in zf.namelist():
                    raise ValueError(f"{self.path} has no images (key {key!r}; keys: {names}): not an ADM sample "
                                     "batch")
                self.info = zf.getinfo(f"{key}.npy")
                if self.info.flag_bits & 0x1:
                    raise ValueError(f"{self.path}: {key} is encrypted; write the samples with np.savez")
                with zf.open(self.info) as f:
                    self.shape, header_len = self._read_header(f)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"cannot read {self.path} as an .npz file ({err}): is it truncated or not an .npz?") \
                from err
        self._row_bytes = int(np.prod(self.shape[1:]))
        if self.info.file_size != header_len + len(self) * self._row_bytes:
            raise ValueError(f"{self.path}: {key} holds {self.info.file_size - header_len} bytes of data, but its "
                             f"header says {self.shape} uint8 ({len(self) * self._row_bytes} bytes): the file is "
                             "truncated or corrupt; write it again")
        self.stored = self.info.compress_type == zipfile.ZIP_STORED
        if self.stored:
            self._data_offset = self._member_offset() + header_len
            end = self._data_offset + len(self) * self._row_bytes
            if end > self.path.stat().st_size:
                raise ValueError(f"{self.path} ends before the last image of {key}: the file is truncated; "
                                 "write it again")
        self._header_len = header_len

    def _read_header(self, f) -> tuple[tuple[int, int, int, int], int]:
        """(shape, header length in bytes) of the `.npy` at the start of `f`, read without any data."""
        where = f"{self.path}: {self.key}"
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
        except ValueError as err:
            raise ValueError(f"{where} is not a readable .npy array ({err}): write the samples with np.savez or "
                             "dit.io.npz.write_samples_npz") from err
        if dtype.hasobject:
            raise ValueError(f"{where}: cannot read {self.key!r} without unpickling (an object array); only plain "
                             "arrays are accepted")
        if dtype != np.uint8:
            raise TypeError(f"{where} must be uint8 (N, H, W, 3) in 0..255, got dtype {dtype}: convert samples in "
                            "[-1, 1] with dit.io.images.to_uint8")
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{where} must be shaped (N, H, W, 3) (channels last), got {shape}")
        if fortran_order and sum(d > 1 for d in shape) > 1:
            # Column-major: one image's pixels are spread over the whole member, so a batch cannot be
            # read as one range. np.savez never writes this for a C-ordered array.
            raise ValueError(f"{where} is stored in Fortran (column-major) order, which cannot be read in batches: "
                             "rewrite it with np.savez(path, arr_0=np.ascontiguousarray(images))")
        return tuple(int(d) for d in shape), f.tell()

    def _member_offset(self) -> int:
        """Where the member's bytes start in the archive: after its local header, whose name and
        extra-field lengths may differ from the central directory's."""
        with open(self.path, "rb") as raw:
            raw.seek(self.info.header_offset)
            fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_SIGNATURE:
            raise ValueError(f"{self.path}: bad zip member header for {self.key}: the file is corrupt")
        name_len, extra_len = fields[-2], fields[-1]
        return self.info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.uint8)
        if start == stop:
            return out
        buf = memoryview(out.reshape(-1))  # the reads fill `out` in place: one batch in memory, no copy
        if self.stored:
            with open(self.path, "rb") as raw:
                raw.seek(self._data_offset + start * self._row_bytes)
                _read_exactly(raw, buf, self.path)
            return out
        stream = self._seek_stream(start)
        _read_exactly(stream, buf, self.path)
        self._stream = (*self._stream[:2], stop)
        return out

    def _seek_stream(self, start: int):
        """The decompressing stream positioned at image `start` (restarted if it is already past it)."""
        if self._stream is None or self._stream[2] > start:
            self.close()
            zf = zipfile.ZipFile(self.path)
            stream = zf.open(self.info)
            stream.read(self._header_len)
            self._stream = (zf, stream, 0)
        _, stream, at = self._stream
        skip = (start - at) * self._row_bytes
        while skip > 0:  # decompress and drop, one bounded chunk at a time
            chunk = stream.read(min(skip, 1 << 24))
            if not chunk:
                raise ValueError(f"{self.path} ends before image {start} of {self.key}: the file is truncated")
            skip -= len(chunk)
        return stream

    def close(self) -> None:
        if self._stream is not None:
            zf, stream, _ = self._stream
            stream.close()
            zf.close()
            self._stream = None

    def __del__(self):
        self.close()


def _read_exactly(f, buf: memoryview, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise ValueError(f"{path} ended early while reading images: the file is truncated; write it again")
        done += n


class FolderImages(ImageSource):
    """The image files under `folder` (recursive, sorted by path), each opened when its slice is
    read. They must share one size: FID compares images at the resolution they were made at."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = image_files(self.folder)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.folder}")
        first = self._load(self.files[0])
        self.shape = (len(self.files), *first.shape)

    @staticmethod
    def _load(f: Path) -> np.ndarray:
        try:
            return np.asarray(read_rgb(f))  # an image over the pixel budget is refused before decoding
        except ImageTooLargeError:
            raise  # names the file, its size and the fix already
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {f}: {err}") from err

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.uint8)
        for k, f in enumerate(self.files[start:stop]):
            image = self._load(f)
            if image.shape != self.shape[1:]:
                raise ValueError(f"{f} is {image.shape[:2]} but {self.files[0]} is {self.shape[1:3]}: "
                                 "resize/crop the folder to one size first")
            out[k] = image
        return out


def open_images(source: str | os.PathLike) -> tuple[ImageSource, np.ndarray | None]:
    """(image source, labels (N,) or None) of an ADM `.npz` (labels: its `arr_1`, small, read
    whole) or a folder of image files (no labels). Only headers are read here."""
    source = Path(source).expanduser()
    if source.is_dir():
        return FolderImages(source), None
    if not source.is_file():
        raise FileNotFoundError(f"{source} is neither an .npz file nor a folder of images")
    images = NpzImages(source)
    with open_npz(source) as data:  # np.load's .npz is lazy: only arr_1 is read
        labels = read_npz_labels(data, source, len(images))
    return images, labels
