"""Images from disk: the ADM center crop, RGB decoding with errors that name the file, and
`ImageFolderDataset` (torchvision's ImageFolder layout, root/<class>/<image>).

    ds = ImageFolderDataset("imagenet/train", image_size=256)   # (3, 256, 256) in [-1, 1], label

The horizontal flip of item i in epoch e is drawn from `item_seed(seed, e, i)` (dit/data/seeds.py),
so it does not depend on the DataLoader worker that loads the item.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from dit.data.seeds import draw_flip, item_generator
from dit.io.images import ImageTooLargeError, read_rgb

log = logging.getLogger(__name__)


class BadImageError(OSError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


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
    """Open and fully decode an image as 8-bit RGB (`dit.io.images.read_rgb`: 16-bit greyscale is
    scaled, not clipped); any failure becomes a BadImageError naming the file, and so does an image
    over the pixel budget (`dit.io.images.MAX_IMAGE_PIXELS`), refused from its header before any
    pixel is decoded. (PIL decodes lazily, so `convert` is what surfaces a truncated file.)"""
    try:
        return read_rgb(path)  # 16-bit greyscale scaled to 8 bits, not clipped to white
    except ImageTooLargeError as err:
        raise BadImageError(f"{err}; or set skip_bad=True (data.skip_bad=true) to skip it") from err
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise BadImageError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Replace or delete the file, "
            "or set skip_bad=True to skip unreadable images"
        ) from err


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_problem(real: str, own: str, root_real: str, class_real: dict[str, str]) -> str | None:
    """Why a symlink (to `real`, found in class folder `own`) must not be followed, or None."""
    if _inside(root_real, real):
        return "it leads back to the data set's root (a loop)"
    for name, folder in class_real.items():
        if folder != own and (_inside(real, folder) or _inside(folder, real)):
            return f"it leads into class folder {name!r}, whose images would get this class's label"
    return None


def _special_file(entry: os.DirEntry) -> str | None:
    """What an entry named like an image is when it is not a regular file (a FIFO, whose open
    blocks until someone writes to it; a socket; a device, which may never end), or a link to
    one; None for a regular file. For an entry that is not a link this is the directory listing's
    own file type (no stat on most file systems: ImageNet's 1.3M files cost nothing more); a link
    is followed (one stat). A dangling link is None here: it fails as an unreadable file when read."""
    if entry.is_file():  # follows a link; for anything else the listing's own type
        return None
    try:
        mode = entry.stat().st_mode
    except OSError:  # a dangling link, or gone since the listing
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def index_image_folder(root: str | os.PathLike,
                       dangling: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of an ImageFolder: torchvision's layout, labels and order (class
    folders sorted by name, then the directories of each, recursively, sorted by path, then file
    names sorted), following symlinks as torchvision does, but never into a loop nor twice to the
    same images: a directory link that leads to a folder already indexed, to the root or into
    another class's folder, and a file link to an image indexed under another path or in another
    class, are skipped with a warning naming the link. Only regular files are indexed: a FIFO,
    socket or device named like an image (or a link to one) is skipped with a warning naming it,
    before anything opens it (`data_identity` reads one file per class at start-up).

    `dangling`: if a list, links named like an image whose target does not exist are appended
    to it and left out of the index (the caller decides: skip them or refuse); otherwise they are
    indexed, and fail as unreadable files when read."""
    root = str(Path(root).expanduser())
    classes = _class_folders(Path(root))
    root_real = os.path.realpath(root)
    class_real = {name: os.path.realpath(os.path.join(root, name)) for name in classes}
    visited: set[str] = set()  # real paths of the directories indexed
    listing: list[tuple[str, int, list[str]]] = []  # (directory as shown, label, image file names)
    names_by_real: dict[str, list[str]] = {}  # real directory -> its image files that are not links, sorted
    linked: list[tuple[int, str, str, str]] = []  # (label, directory as shown, file name, real target) of file links

    def skip(link: str, real: str, why: str) -> None:
        warnings.warn(f"image folder {root}: not indexing {link} -> {real}: {why}", stacklevel=3)

    for label, name in enumerate(classes):
        own = class_real[name]
        if own in visited:
            skip(os.path.join(root, name), own, "the same folder as another class")
            continue
        visited.add(own)
        stack = [(os.path.join(root, name), own)]
        while stack:
            shown, real = stack.pop()
            try:
                entries = sorted(os.scandir(shown), key=lambda e: e.name)
            except OSError:  # unreadable directory: skipped, as torchvision's os.walk does
                continue
            files, direct = [], []  # image files; those that are not links
            for entry in entries:
                is_link = entry.is_symlink()
                if entry.is_dir():
                    target = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
                    why = ("it leads to a folder already indexed (a loop, or a second path to the same images)"
                           if target in visited else _link_problem(target, own, root_real, class_real) if is_link
                           else None)
                    if why:
                        skip(entry.path, target, why)
                        continue
                    visited.add(target)
                    stack.append((entry.path, target))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    special = _special_file(entry)
                    if special:
                        warnings.warn(f"image folder {root}: not indexing {entry.path}: it is {special}, not a regular "
                                      "file, and opening it could block start-up or a DataLoader worker forever; "
                                      "move it out of the data set", stacklevel=2)
                        continue
                    if not is_link:
                        files.append(entry.name)
                        direct.append(entry.name)
                        continue
                    if dangling is not None and not entry.is_file() and not os.path.exists(entry.path):
                        dangling.append(entry.path)  # a link to nothing: one stat, links only
                        continue
                    target = os.path.realpath(entry.path)
                    why = _link_problem(target, own, root_real, class_real)
                    if why:
                        skip(entry.path, target, why)
                    else:
                        linked.append((label, shown, entry.name, target))
                        files.append(entry.name)
            listing.append((shown, label, files))
            names_by_real[real] = direct

    # File links to an image that is also indexed directly, or through an earlier link: once only.
    drop, targets = set(), set()
    for _, shown, name, target in sorted(linked):
        folder, base = os.path.split(target)
        direct = names_by_real.get(folder, [])
        k = bisect.bisect_left(direct, base)
        if (k < len(direct) and direct[k] == base) or target in targets:
            skip(os.path.join(shown, name), target, "the same image is already indexed")
            drop.add(os.path.join(shown, name))
        targets.add(target)
    samples = [(os.path.join(shown, f), label) for shown, label, files in sorted(listing, key=lambda e: (e[1], e[0]))
               for f in files if os.path.join(shown, f) not in drop]
    return classes, samples


def check_image_root(root: str | os.PathLike) -> None:
    """Clear errors for the layouts torchvision would reject with a terse message (a missing
    folder, a file, no class subfolders). Cheap: entry points call it before slow set-up."""
    root = Path(root).expanduser()
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
        check_image_root(root)
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = root
        dangling: list[str] = []
        self._classes, samples = index_image_folder(root, dangling)
        counts = np.bincount(np.asarray([y for _, y in samples], dtype=np.int64), minlength=len(self._classes))
        if counts.sum() == 0:
            raise ValueError(
                f"empty dataset: no image files under {root} (extensions {', '.join(IMG_EXTENSIONS)}); "
                "add images to its class subfolders"
            )
        empty = [name for name, n in zip(self._classes, counts) if n == 0]
        if empty:
            listed = ", ".join(str(root / name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(
                f"{len(empty)} empty class folder(s) without image files: {listed}; "
                "add images or remove the folder(s) so labels stay contiguous"
            )
        self.samples: list[tuple[str, int]] = samples
        self.image_size = int(image_size)
        self.hflip = hflip
        self.skip_bad = skip_bad
        self.seed = int(seed)
        self.epoch = 0
        self.bad_files: set[str] = set()
        if dangling:  # `data_identity` sizes every file at start-up: a link to nothing must not get there
            shown = ", ".join(dangling[:5]) + (f" and {len(dangling) - 5} more" if len(dangling) > 5 else "")
            if not skip_bad:
                raise BadImageError(f"{len(dangling)} link(s) in the image folder point to nothing: {shown}. Remove "
                                    "them, or set skip_bad=True (data.skip_bad=true) to skip unreadable images")
            for link in dangling:
                self._note_bad(link, BadImageError(f"{link} is a link to a file that does not exist"))

    @property
    def classes(self) -> list[str]:
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self._classes)

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
            message = f"skipping unreadable image ({err})"
            log.warning(message)  # into the run's log file (train.log), not only stderr
            warnings.warn(message, stacklevel=3)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """The cropped image tensor (never flipped) and label of item `index`; BadImageError if
        the file is unreadable."""
        path, label = self.samples[index]
        return pil_to_tensor(center_crop_arr(load_rgb(path), self.image_size)), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip = self.hflip and draw_flip(item_generator(self.seed, self.epoch, index))
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
        files from the index (changing `len`) and returns how many were dropped. For a start-up
        check before training (a config option), so a bad file fails or is counted up front."""
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
