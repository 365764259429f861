"""Images as arrays and files: the pixel conversion of samples, image files read as 8-bit RGB,
folders of images, and PNG grids.

Images everywhere are uint8 (N, H, W, 3) numpy arrays (contract 3 in docs/design.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.io.atomic import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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

# The pixel budget of one image file (width x height), checked from the file's header before any
# pixel is decoded, wherever images are read (training data, latent caching, FID folders). 2**26
# (67 Mpx, 8192 x 8192, about 270 MB once decoded as RGB) is far above any photo a model at
# 256 or 512 pixels learns from (ImageNet's largest are a few tens of Mpx) and bounds what one
# file can cost a DataLoader worker: a 351 KB 16-bit PNG declaring 13000 x 13000 pixels took
# 3.1 GB. Raise it here (in every process that reads images) if a data set really needs more;
# PIL's own limit (Image.MAX_IMAGE_PIXELS, refused above twice it) still applies above that.
MAX_IMAGE_PIXELS = 1 << 26

_CONVERT_BLOCK_PIXELS = 1 << 18  # pixels per block of the 16-bit conversion: its temporaries stay ~1-2 MB


class ImageTooLargeError(ValueError):
    """An image file whose declared size is over the pixel budget (MAX_IMAGE_PIXELS), refused
    before it is decoded: a decompression bomb, or a picture far larger than training needs."""


def _too_large(name: str | os.PathLike, what: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image {name} is {what}, over the pixel budget of {MAX_IMAGE_PIXELS:,} pixels "
        f"(dit.io.images.MAX_IMAGE_PIXELS; decoding it could take gigabytes of memory in every worker, "
        "a decompression bomb or a picture far larger than training needs): it was not decoded; "
        "resize it (e.g. to 4096 pixels on its long side) or remove it from the folder")


def open_image(file, name: str | os.PathLike | None = None):
    """PIL's `Image.open(file)` (a path or a binary file object), refused with ImageTooLargeError
    naming the file (`name`, or `file` itself) when its declared size is over MAX_IMAGE_PIXELS:
    only the header is read, nothing is decoded yet. PIL's decompression-bomb warning and error
    never surface: the first is replaced by this check, the second becomes this error."""
    from PIL import Image

    name = file if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            image = Image.open(file)
    except Image.DecompressionBombError as err:  # over twice PIL's own limit: refused in Image.open
        raise _too_large(name, f"too large to open ({err})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(name, f"{width}x{height} = {width * height:,} pixels")
    return image


def read_rgb(path: str | os.PathLike):
    """The image file `path` decoded as 8-bit RGB (`image_to_rgb`), checked against the pixel
    budget before decoding (`open_image`). PIL's errors (OSError, ValueError, ...) propagate."""
    with open(path, "rb") as f, open_image(f, path) as image:
        return image_to_rgb(image, path)


def image_to_rgb(image, name: str | os.PathLike = "image"):
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes I;16*, and I as 16-bit PNGs decode) is
    scaled to 8 bits (v * 255 / 65535, rounded: exact for 8-bit values stored as v * 257) rather
    than clipped; values outside 0..65535 or float images are refused, naming the file.

    The 16-bit conversion works on blocks of rows in 32-bit integers (v * 255 + 32767 < 2**32):
    besides the decoded image and the result it needs a megabyte or two, not the 8 bytes per
    pixel of 64-bit temporaries."""
    from PIL import Image

    if image.mode in WIDE_GREY_MODES:
        low, high = image.getextrema() if image.mode == "I" else (0, 0)  # I;16*: unsigned 16-bit already
        if low < 0 or high > 65535:  # getextrema decodes and scans in PIL, without a copy
            raise ValueError(f"{name}: {image.mode} image with values {low}..{high}, outside the 16-bit "
                             "range 0..65535: convert it to an 8-bit RGB PNG or JPEG first")
        width, height = image.size
        grey = np.empty((height, width), dtype=np.uint8)
        rows = max(1, _CONVERT_BLOCK_PIXELS // max(width, 1))
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            block = np.asarray(image.crop((0, top, width, bottom))).astype(np.uint32)  # 0..65535
            block *= 255
            block += 32767
            block //= 65535  # the same rounding as (v * 255 + 32767) // 65535 in any wider type
            grey[top:bottom] = block
        return Image.fromarray(grey).convert("RGB")  # a 2-D uint8 array is mode L
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
            "with dit.io.images.to_uint8"
        )
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be shaped (N, H, W, 3) (channels last), got {arr.shape}")
    return arr


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """All images under `folder` (recursively, sorted by path) as uint8 (N, H, W, 3). They must share
    one size: FID compares images at the resolution they were generated or prepared at. An image over
    the pixel budget (MAX_IMAGE_PIXELS) is refused naming it, before it is decoded."""
    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = []
    for f in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 1000):
        try:
            images.append(np.asarray(read_rgb(f)))
        except ImageTooLargeError:
            raise  # names the file, its size and the fix already
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {f}: {err}") from err
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{f} is {images[-1].shape[:2]} but {files[0]} is {images[0].shape[:2]}: "
                             "resize/crop the folder to one size first")
    return np.stack(images)


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
