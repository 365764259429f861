"""The second reliability attack (issue 21) on the latents cache: each test reproduces the attack
as the issue describes it and shows it refused before any training step.

- item 3: a latents cache of other images with an identical `meta.json` resumed silently (the
  cache's fingerprint was its metadata only);
- item 5: a cache shard with a `std` of the wrong shape or out-of-range labels trained silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, train_config

from dit.autoencoder import PixelAutoencoder, build_autoencoder
from dit.config import ConfigError
from dit.data import CacheFormat, CacheRun, LatentCacheDataset, LatentCacheMismatch, build_latent_cache
from dit.train import run_training
from dit.train.stream import data_identity

IMAGE_SIZE = 16


def _write_images(root: Path, invert: bool = False) -> Path:
    """Two classes of three random 16x16 PNGs, always the same pixels; `invert`: 255 - them, under
    the same names (the same folder with inverted colours)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        folder = root / ("cat" if i < 3 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - pixels if invert else pixels).save(folder / f"{i}.png")
    return root


def _build(images: Path, out: Path) -> Path:
    # pixel space: the cache holds the images themselves, so inverted images give other shards
    return build_latent_cache(images, build_autoencoder("pixel"), out, IMAGE_SIZE,
                              fmt=CacheFormat(dtype="float32", shard_size=2),
                              run=CacheRun(batch_size=2, num_workers=0, device="cpu", progress=False))


def _settings(cache: Path) -> dict:
    """meta.json without what records the shards' contents (their sizes and digests)."""
    meta = json.loads((cache / "meta.json").read_text())
    meta["shards"] = [{k: s[k] for k in ("file", "count")} for s in meta["shards"]]
    return meta


def _train_config(cache: Path, steps: int):
    return train_config([*TINY_MODEL, "data=latents", f"data.root={cache}", "data.num_workers=0", "data.hflip=false",
                         "global_batch_size=2", f"max_steps={steps}", "log.every=1", "log.samples.every=0",
                         "ckpt.every=1", "name=cache"])


# ------------------------------------------------------------------------------ item 3


def test_a_cache_of_other_images_with_the_same_metadata_is_refused_on_resume(tmp_path, one_thread):
    images = _write_images(tmp_path / "images")
    plain = _build(images, tmp_path / "plain")
    _write_images(images, invert=True)  # the same folder, inverted colours
    inverted = _build(images, tmp_path / "inverted")
    assert _settings(plain) == _settings(inverted)  # equal metadata: only the contents differ

    # The fingerprint a checkpoint records tells the two caches apart.
    identity = {name: data_identity("latents", LatentCacheDataset(cache))
                for name, cache in (("plain", plain), ("inverted", inverted))}
    assert identity["plain"]["fingerprint"] != identity["inverted"]["fingerprint"]

    # A run trained on one cache, resumed on the other: refused before any step.
    run_dir = tmp_path / "run"
    run_training(_train_config(plain, 1), run_dir)
    with pytest.raises(ConfigError, match=r"is not the data set checkpoint .* was trained on"):
        run_training(_train_config(inverted, 2), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["0000001.pt"]

    # The other cache's shards copied under the first one's meta.json: refused when the cache is
    # opened, naming the shards and the fix.
    for shard in inverted.glob("shard_*.pt"):
        shutil.copyfile(shard, plain / shard.name)
    with pytest.raises(LatentCacheMismatch, match=r"shard_00000\.pt .*shard_00002\.pt .*rebuild the cache"):
        LatentCacheDataset(plain)
    with pytest.raises(LatentCacheMismatch, match="not the files it was built with"):
        run_training(_train_config(plain, 2), run_dir)

    # A cache built before the digests (none in its meta.json) still opens, with the identity it
    # always had (a hash of its meta.json), and trains.
    (inverted / "meta.json").write_text(json.dumps(_settings(inverted), indent=2))
    assert len(LatentCacheDataset(inverted)) == 6
    assert run_training(_train_config(inverted, 1), tmp_path / "old_run")["step"] == 1


# ------------------------------------------------------------------------------ item 5


class _PixelMoments(PixelAutoencoder):
    """The images as the posterior mean, with a small positive std: a cache that stores `std`, as
    a VAE's does, in pixel space (so `vae=pixel` trains on it)."""

    def encode_moments(self, images):
        return images, 0.01 + 0.01 * images.abs()


def _ten_class_cache(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c in range(10):
        (images / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(images / f"c{c}" / "0.png")
    return build_latent_cache(images, _PixelMoments(), tmp_path / "cache", IMAGE_SIZE,
                              fmt=CacheFormat(dtype="float32", shard_size=5),
                              run=CacheRun(batch_size=5, num_workers=0, device="cpu", progress=False))


def _tamper(cache: Path, name: str, change, record_digest: bool) -> None:
    """Rewrite shard `name` with `change(shard)` applied; its digest recorded in meta.json (as
    another builder would), or no digests at all (a cache built before them)."""
    path = cache / name
    shard = torch.load(path, weights_only=True)
    change(shard)
    torch.save(shard, path)
    meta = json.loads((cache / "meta.json").read_text())
    for entry in meta["shards"]:
        for key in ("bytes", "sha256"):
            entry.pop(key, None)
        if record_digest:
            shard_file = cache / entry["file"]
            entry["bytes"] = shard_file.stat().st_size
            entry["sha256"] = hashlib.sha256(shard_file.read_bytes()).hexdigest()
    (cache / "meta.json").write_text(json.dumps(meta, indent=2))


def _wrong_std_shape(shard):
    # one std per channel, 4 instead of ~0.01: it broadcasts, and items span about -16..16
    shard["std"] = torch.full((*shard["std"].shape[:3], 1, 1), 4.0)


def _null_class_label(shard):
    shard["labels"][1] = 10  # the null class of classifier-free guidance, with 10 classes


def _nan_mean(shard):
    shard["mean"][0, 0, 0, 0, 0] = float("nan")


def _half_std(shard):
    shard["std"] = shard["std"].half()  # meta.json says float32


@pytest.mark.parametrize("change, named", [(_wrong_std_shape, r"std of shape \(5, 2, 3, 1, 1\)"),
                                           (_null_class_label, r"labels outside 0\.\.9 \(e\.g\. 10"),
                                           (_nan_mean, "NaN/inf values in mean"),
                                           (_half_std, "std of shape .* torch.float16")])
@pytest.mark.parametrize("record_digest", [True, False], ids=["digests", "no-digests"])
def test_a_cache_shard_with_wrong_arrays_is_refused_before_training(tmp_path, one_thread, change, named,
                                                                    record_digest):
    cache = _ten_class_cache(tmp_path)
    before = LatentCacheDataset(cache, hflip=False)
    assert before.num_classes == 10 and float(before[7][0].abs().max()) < 1.1  # a sound cache: about -1..1
    _tamper(cache, "shard_00001.pt", change, record_digest)

    # Training on it is refused before any step, naming the shard, what is wrong and the fix.
    with pytest.raises(LatentCacheMismatch, match=rf"shard_00001\.pt \(.*{named}.*rebuild the cache") as err:
        run_training(_train_config(cache, 1), tmp_path / "run")
    assert "shard_00000" not in str(err.value)  # the sound shard is not named
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(LatentCacheMismatch, match=named):
        LatentCacheDataset(cache, hflip=False)
