"""Images as arrays and files: the pixel conversion of samples, image files read as 8-bit RGB,
folders of images, and PNG grids.

Images everywhere are uint8 (N, H, W, 3) numpy arrays (contract 3 in docs/design.md).
"""

from __future__ import annotations

import os
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
