"""Issue 21, items 11 and 18 (FID folder): a decompression bomb among the images. A 16-bit
greyscale PNG of 351 KB declaring 13000 x 13000 pixels was decoded in full by `load_rgb`, and its
16-bit values converted through 64-bit temporaries: 3.1 GB in one DataLoader worker (times 4
workers); the same file in an FID samples or reference folder took that memory too, and one
declaring more than twice PIL's limit ended `eval_fid.py` in a raw DecompressionBombError
traceback. Now every image is checked against a pixel budget (`dit.io.images.MAX_IMAGE_PIXELS`)
from its header, before any pixel is decoded, wherever images are read: in training data and
latent caching it is a BadImageError naming the file (skipped under `data.skip_bad=true`), in an
FID folder one `error:` line naming the file and the fix. The 16-bit conversion works on blocks
of rows in 32-bit integers, keeping the same 8-bit values.
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import assert_one_line, run_program
from dit.data.images import BadImageError, ImageFolderDataset, load_rgb
from dit.data.toy import write_toy_imagefolder
from dit.io.images import MAX_IMAGE_PIXELS, read_image_folder
from dit.io.npz import write_samples_npz
from dit.scoring.images import open_images

BOMB_SIDE = 13000  # 169 Mpx: over the budget, between PIL's warning (89 Mpx) and its refusal (179 Mpx)
HUGE_SIDE = 20000  # 400 Mpx: over twice PIL's limit, which PIL refuses inside Image.open


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_grey16_png(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """A 16-bit greyscale PNG of `width` x `height` black pixels, written by hand (the rows of zeros
    compressed as a stream: a 13000 x 13000 file is ~330 KB, made in about a second without ever
    holding the image). `rows`: write only that many rows (a file whose header declares the size
    but whose pixels stop early: only the header matters to a check made before decoding)."""
    row = bytes(1 + 2 * width)  # filter byte 0, then 2 bytes per pixel
    per_call = max(1, (1 << 22) // len(row))
    compressor = zlib.compressobj(9)
    parts, left = [], height if rows is None else rows
    while left:
        n = min(left, per_call)
        parts.append(compressor.compress(row * n))
        left -= n
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # bit depth 16, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """The attack's file: a complete, valid 16-bit 13000 x 13000 PNG of a few hundred KB."""
    path = write_grey16_png(tmp_path_factory.mktemp("bomb") / "bomb.png", BOMB_SIDE, BOMB_SIDE)
    assert path.stat().st_size < 400_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning
        with Image.open(path) as im:
            assert im.size == (BOMB_SIDE, BOMB_SIDE) and im.mode.startswith("I")  # really 16 bits, as declared
    return path


@pytest.fixture
def no_decoding_over_the_budget(monkeypatch):
    """Fails any decode of an image over the pixel budget: the check must come before it."""
    load = ImageFile.ImageFile.load

    def checked_load(self):
        assert self.size[0] * self.size[1] <= MAX_IMAGE_PIXELS, f"decoding a {self.size} image"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", checked_load)


def _planted(root: Path, bomb_file: Path, name: str = "000_bomb.png") -> Path:
    """`bomb_file` copied into the first class folder of the toy ImageFolder at `root`."""
    first_class = min(p for p in root.iterdir() if p.is_dir())
    target = first_class / name
    target.write_bytes(bomb_file.read_bytes())
    return target


def test_a_huge_16_bit_png_in_an_image_folder_is_a_bad_image_naming_it_and_skipped_under_skip_bad(
        tmp_path, bomb, no_decoding_over_the_budget):
    root = write_toy_imagefolder(tmp_path / "images", num_per_class=2, image_size=16, seed=0)
    planted = _planted(root, bomb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not surface either
        with pytest.raises(BadImageError) as caught:
            load_rgb(planted)
    message = str(caught.value)
    for part in (str(planted), f"{BOMB_SIDE}x{BOMB_SIDE}", "pixel budget", f"{MAX_IMAGE_PIXELS:,}", "resize it",
                 "remove it", "data.skip_bad=true"):
        assert part in message, (part, message)

    ds = ImageFolderDataset(root, 16, hflip=False)
    index = [p for p, _ in ds.samples].index(str(planted))
    with pytest.raises(BadImageError, match="000_bomb.png.*pixel budget"):
        ds[index]

    ds = ImageFolderDataset(root, 16, hflip=False, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping unreadable image.*000_bomb.png.*pixel budget"):
        x, _ = ds[index]  # the next readable item instead
    assert tuple(x.shape) == (3, 16, 16) and ds.num_skipped == 1

    # The latents cache builder reads items the same way: under skip_bad the file is left out, named.
    from dit.data.cache import _CacheItems

    _, _, _, ok, why = _CacheItems(ds, [index])[0]
    assert not ok and str(planted) in why and "pixel budget" in why


def test_a_png_over_twice_pils_limit_is_the_same_clear_error_not_pils(tmp_path, no_decoding_over_the_budget):
    huge = write_grey16_png(tmp_path / "huge.png", HUGE_SIDE, HUGE_SIDE, rows=4)  # PIL refuses it in Image.open
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match="huge.png.*pixel budget.*data.skip_bad=true"):
            load_rgb(huge)
        with pytest.raises(ValueError, match="huge.png.*pixel budget.*resize it"):
            read_image_folder(tmp_path)


def _fid_args(tmp_path: Path, samples, reference) -> list[str]:
    return [f"samples={samples}", f"reference={reference}", "device=cpu", "feature_extractor=toy_judge",
            f"cache_dir={tmp_path / 'cache'}", "metrics=[fid]", "results_table=null"]


class _NoFeatures:
    """Stands in for the feature extractor (the toy judge trains for a minute on first use): the
    folder is refused before any image reaches an extractor, so none of its methods is needed."""

    identity = "no-features"
    precision = None


@pytest.mark.parametrize("planted_in", ["samples", "reference"])
def test_eval_fid_with_a_decompression_bomb_in_a_folder_ends_in_one_line_naming_it(
        tmp_path, bomb, planted_in, capsys, monkeypatch, no_decoding_over_the_budget):
    from dit.scoring import evaluator

    monkeypatch.setattr(evaluator, "build_feature_extractor", lambda *args, **kwargs: _NoFeatures())
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(1, 5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    planted = folder / "0_bomb.png"  # sorts first: the file that gives the folder its image size
    planted.write_bytes(bomb.read_bytes())
    other = write_samples_npz(tmp_path / "other.npz", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    samples, reference = (folder, other) if planted_in == "samples" else (other, folder)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("eval_fid.py", _fid_args(tmp_path, samples, reference), capsys, monkeypatch)
    assert_one_line(code, err, str(planted), f"{BOMB_SIDE}x{BOMB_SIDE}", "pixel budget", "resize it")
    assert "DecompressionBomb" not in err

    # A bomb over twice PIL's own limit (refused inside PIL's Image.open): the same one line.
    planted.unlink()
    huge = write_grey16_png(folder / "0_huge.png", HUGE_SIDE, HUGE_SIDE, rows=4)
    code, _, err = run_program("eval_fid.py", _fid_args(tmp_path, samples, reference), capsys, monkeypatch)
    assert_one_line(code, err, str(huge), "pixel budget", "resize it")


def test_the_fid_folder_reader_refuses_a_bomb_met_after_the_first_image(tmp_path, bomb, no_decoding_over_the_budget):
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    planted = tmp_path / "2_bomb.png"
    planted.write_bytes(bomb.read_bytes())
    images = open_images(tmp_path)[0]  # sized from 0.png
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=f"2_bomb.png is {BOMB_SIDE}x{BOMB_SIDE}.*pixel budget.*resize it"):
            images.read(0, 5)
        with pytest.raises(ValueError, match="2_bomb.png is .*pixel budget"):
            read_image_folder(tmp_path)


def test_16_bit_conversion_uses_no_64_bit_temporaries_and_keeps_its_8_bit_values(tmp_path):
    side = 2000  # 4 Mpx: 64-bit temporaries of it would be 32 MB each
    y, x = np.mgrid[:side, :side]
    wide = ((x * 131 + y * 977 + (x * y) % 7919) % 65536).astype(np.uint16)  # every 16-bit region, compressible
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path, compress_level=1)
    expected = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # the conversion as it was
    del y, x, wide

    tracemalloc.start()
    try:
        rgb = load_rgb(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"converting a {side}x{side} 16-bit image peaked at {peak / 2**20:.1f} MB"
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=-1))
