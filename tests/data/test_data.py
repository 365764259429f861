"""The data layer: ADM crop, ImageFolder errors, the latents cache and the resumable sampler."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from dit.autoencoder import build_autoencoder
from dit.data import (
    BadImageError,
    DistributedResumableSampler,
    ImageFolderDataset,
    LatentCacheDataset,
    CacheFormat,
    CacheRun,
    LatentCacheMismatch,
    build_latent_cache,
    center_crop_arr,
    pil_to_tensor,
)

IMAGE_SIZE = 16


def _save_image(path, rng, height, width):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Two classes, 7 images of assorted sizes (landscape, portrait, already small)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    sizes = [(20, 24), (40, 33), (16, 16), (24, 50), (35, 17), (64, 64), (18, 30)]
    for i, (h, w) in enumerate(sizes):
        _save_image(root / ("cat" if i < 4 else "dog") / f"{i}.png", rng, h, w)
    return root


# ---------------------------------------------------------------------------- center crop


def test_center_crop_box_halves_until_short_side_below_twice_size():
    # Constant 4x4 blocks: two exact box halvings turn every block into one pixel, so the
    # expected result is just the block grid, centre-cropped.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)  # (H, W, 3)
    image = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))  # 96 x 64 (W x H)
    out = center_crop_arr(image, 16)  # 96x64 -> 48x32 -> 24x16 (short side 16 < 32), crop x 4..20
    assert out.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(out), blocks[:, 4:20])


def test_center_crop_bicubic_resize_and_offset_match_independent_resize():
    # Short side 45 < 2 * 24: no box step; bicubic to 24 x round(70 * 24 / 45) = 37, crop x 6..30.
    rng = np.random.default_rng(2)
    small = torch.from_numpy(rng.uniform(0, 255, (1, 3, 9, 14))).float()
    smooth = F.interpolate(small, size=(45, 70), mode="bilinear", align_corners=False)
    arr = smooth[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 24)).astype(np.float64)
    # Independent: torch's antialiased bicubic (designed to follow PIL's), then slicing.
    ref = F.interpolate(torch.from_numpy(arr).permute(2, 0, 1)[None].double(), size=(24, 37),
                        mode="bicubic", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    err = np.abs(out - ref[:, 6:30]).max()
    shifted = np.abs(out - ref[:, 7:31]).max()
    assert out.shape == (24, 24, 3)
    assert err <= 2.0
    assert shifted > 4 * max(err, 1.0)  # the comparison can tell a one-pixel offset


def test_pil_to_tensor_matches_torchvision_normalize():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    ref = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])(image)
    torch.testing.assert_close(pil_to_tensor(image), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------- ImageFolder


def test_image_folder_items_labels_and_seeded_flip(image_folder):
    ds = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=True, seed=5)
    plain = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    assert len(ds) == 7 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    assert [ds[i][1] for i in range(7)] == [0, 0, 0, 0, 1, 1, 1]
    x, _ = plain[1]
    ref = pil_to_tensor(center_crop_arr(Image.open(image_folder / "cat" / "1.png").convert("RGB"), IMAGE_SIZE))
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1

    flips = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(7):
            item, base = ds[i][0], plain[i][0]
            if torch.equal(item, base.flip(-1)):
                flips.append(True)
            else:
                torch.testing.assert_close(item, base, rtol=0, atol=0)
                flips.append(False)
    assert 0 < sum(flips) < len(flips)  # both mirrors occur
    again = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=True, seed=5)
    again.set_epoch(5)
    ds.set_epoch(5)
    assert all(torch.equal(again[i][0], ds[i][0]) for i in range(7))  # a pure function of (seed, epoch, index)


def test_image_folder_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", IMAGE_SIZE)


def test_image_folder_empty_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="empty dataset.*no class subfolders"):
        ImageFolderDataset(tmp_path, IMAGE_SIZE)
    _save_image(tmp_path / "loose.png", np.random.default_rng(0), 8, 8)
    with pytest.raises(ValueError, match="images sit directly"):
        ImageFolderDataset(tmp_path, IMAGE_SIZE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="empty dataset: no image files"):
        ImageFolderDataset(tmp_path, IMAGE_SIZE)


def test_image_folder_empty_class_folder_is_named(image_folder):
    (image_folder / "zebra").mkdir()
    (image_folder / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty class folder.*zebra"):
        ImageFolderDataset(image_folder, IMAGE_SIZE)


def _break_files(root):
    """One non-image file with an image name, one truncated PNG."""
    junk = root / "cat" / "1.png"
    junk.write_bytes(b"this is not a png at all" * 10)
    truncated = root / "dog" / "5.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return junk, truncated


def test_bad_files_raise_an_error_naming_the_file(image_folder):
    junk, truncated = _break_files(image_folder)
    ds = ImageFolderDataset(image_folder, IMAGE_SIZE)
    with pytest.raises(BadImageError, match=str(junk)):
        ds[1]
    with pytest.raises(BadImageError, match=str(truncated)):
        ds[5]
    with pytest.raises(BadImageError, match="skip_bad"):
        ds.scan(progress=False)


def test_skip_bad_skips_and_counts(image_folder):
    junk, truncated = _break_files(image_folder)
    ds = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False, skip_bad=True)
    with pytest.warns(UserWarning, match=str(junk)):
        x, label = ds[1]
    torch.testing.assert_close(x, ds[2][0])  # the next readable item stands in
    assert ds.num_skipped == 1
    with pytest.warns(UserWarning, match=str(truncated)):
        assert ds.scan(progress=False) == 2
    assert len(ds) == 5 and ds.num_skipped == 2


# ---------------------------------------------------------------------------- latents cache


def _direct_moments(ae, images, index, flip):
    x, _ = images.load(index)
    if flip:
        x = x.flip(-1)
    mean, std = ae.encode_moments(x[None])
    return mean[0], std[0]


def test_latent_cache_round_trip_equals_direct_encoding(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    out = build_latent_cache(image_folder, ae, tmp_path / "cache", IMAGE_SIZE,
                             fmt=CacheFormat(dtype="float32", shard_size=3),
                             run=CacheRun(batch_size=2, num_workers=0, device="cpu", progress=False))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 7 and len(meta["shards"]) == 3
    assert meta["autoencoder"] == ae.to_dict() and meta["classes"] == ["cat", "dog"]

    ds = LatentCacheDataset(out, hflip=True, sample_posterior=True, seed=3)
    assert len(ds) == 7 and ds.num_classes == 2 and ds.latent_shape == (4, 8, 8)
    assert ds.autoencoder_spec == ae.to_dict()
    images = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    seen_flips = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(7):
            flip, eps = ds.noise_for(i)
            seen_flips.add(flip)
            mean, std = _direct_moments(ae, images, i, flip)
            assert std.abs().min() > 0  # the posterior is really sampled
            latent, label = ds[i]
            torch.testing.assert_close(latent, (mean + std * eps) * ae.scale_factor, rtol=1e-4, atol=1e-5)
            assert label == images[i][1]
    assert seen_flips == {False, True}
    # The same seed picks the same mirrors as the on-the-fly ImageFolder pipeline.
    on_the_fly = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=True, seed=3)
    on_the_fly.set_epoch(1)
    for i in range(7):
        assert torch.equal(on_the_fly[i][0], images[i][0].flip(-1)) == ds.noise_for(i)[0]
    ds.set_epoch(0)
    first = ds[0][0]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0][0])  # fresh posterior noise every epoch

    means = LatentCacheDataset(out, hflip=False, sample_posterior=False)
    mean, _ = _direct_moments(ae, images, 4, flip=False)
    torch.testing.assert_close(means[4][0], mean * ae.scale_factor, rtol=1e-4, atol=1e-5)


def test_latent_cache_float16_is_close(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    out = build_latent_cache(image_folder, ae, tmp_path / "c16", IMAGE_SIZE,
                             run=CacheRun(num_workers=0, device="cpu", progress=False))  # default dtype float16
    ds = LatentCacheDataset(out, hflip=False, sample_posterior=False)
    mean, _ = _direct_moments(ae, ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False), 2, flip=False)
    torch.testing.assert_close(ds[2][0], mean * ae.scale_factor, rtol=2e-3, atol=2e-3)


class _FailingAfter:
    """Autoencoder wrapper that counts encoded images and can fail after a number of calls."""

    def __init__(self, ae, fail_after=None):
        self.ae, self.fail_after, self.calls, self.images = ae, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.ae, name)

    def encode_moments(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(x)
        return self.ae.encode_moments(x)


def test_latent_cache_build_resumes_after_interruption(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    kwargs = dict(fmt=CacheFormat(dtype="float32", shard_size=3),
                  run=CacheRun(batch_size=3, num_workers=0, device="cpu", progress=False))
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(image_folder, _FailingAfter(ae, fail_after=1), cache, IMAGE_SIZE, **kwargs)
    assert sorted(p.name for p in cache.iterdir()) == ["build.json", "shard_00000.pt"]  # no partial files
    with pytest.raises(FileNotFoundError, match="incomplete.*rerun"):
        LatentCacheDataset(cache)

    resumed = _FailingAfter(ae)
    build_latent_cache(image_folder, resumed, cache, IMAGE_SIZE, **kwargs)
    assert resumed.images == 2 * 4  # only shards 1 and 2 (4 images, each with its mirror)
    full = build_latent_cache(image_folder, ae, tmp_path / "full", IMAGE_SIZE, **kwargs)
    a, b = LatentCacheDataset(cache, seed=1), LatentCacheDataset(full, seed=1)
    for i in range(7):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)

    with pytest.raises(LatentCacheMismatch, match="different settings.*image_size"):
        build_latent_cache(image_folder, ae, cache, 2 * IMAGE_SIZE, **kwargs)


def test_latent_cache_ranks_split_shards_and_the_last_one_finishes(image_folder, tmp_path):
    ae = build_autoencoder("pixel")
    fmt, run = CacheFormat(dtype="float32", shard_size=2), dict(num_workers=0, device="cpu", progress=False)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="rank 1 done"):
        build_latent_cache(image_folder, ae, cache, IMAGE_SIZE, fmt=fmt, run=CacheRun(rank=1, world_size=2, **run))
    assert sorted(p.name for p in cache.glob("shard_*")) == ["shard_00001.pt", "shard_00003.pt"]
    build_latent_cache(image_folder, ae, cache, IMAGE_SIZE, fmt=fmt, run=CacheRun(rank=0, world_size=2, **run))
    ds = LatentCacheDataset(cache, hflip=False)
    images = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    assert len(ds) == 7
    for i in range(7):
        torch.testing.assert_close(ds[i][0], images[i][0], rtol=0, atol=0)
        assert ds[i][1] == images[i][1]


def test_latent_cache_skips_bad_files_and_records_them(image_folder, tiny_vae_dir, tmp_path):
    junk, truncated = _break_files(image_folder)
    ae = build_autoencoder(str(tiny_vae_dir))
    run = dict(num_workers=0, device="cpu", progress=False)
    with pytest.raises(BadImageError, match=str(junk)):
        build_latent_cache(image_folder, ae, tmp_path / "strict", IMAGE_SIZE, run=CacheRun(**run))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        out = build_latent_cache(image_folder, ae, tmp_path / "lenient", IMAGE_SIZE, run=CacheRun(skip_bad=True, **run))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 5 and sorted(meta["skipped"]) == sorted([str(junk), str(truncated)])
    assert [LatentCacheDataset(out)[i][1] for i in range(5)] == [0, 0, 0, 1, 1]


def test_pixel_cache_stores_images_without_std(image_folder, tmp_path):
    ae = build_autoencoder("pixel")
    out = build_latent_cache(image_folder, ae, tmp_path / "px", IMAGE_SIZE, fmt=CacheFormat(dtype="float32"),
                             run=CacheRun(num_workers=0, device="cpu", progress=False))
    ds = LatentCacheDataset(out, hflip=True, sample_posterior=True, seed=0)
    assert ds.latent_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert "std" not in torch.load(out / "shard_00000.pt", weights_only=True)
    images = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    for i in range(7):
        flip, _ = ds.noise_for(i)
        x = images[i][0]
        torch.testing.assert_close(ds[i][0], x.flip(-1) if flip else x, rtol=0, atol=0)


def test_latent_cache_compatibility_errors(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    out = build_latent_cache(image_folder, ae, tmp_path / "c", IMAGE_SIZE, fmt=CacheFormat(flip=False),
                             run=CacheRun(num_workers=0, device="cpu", progress=False))
    ds = LatentCacheDataset(out, hflip=False)
    ds.check_compatible(latent_channels=4, latent_size=8, num_classes=2, autoencoder_spec=ae.to_dict())
    with pytest.raises(LatentCacheMismatch, match=r"shape \(4, 8, 8\).*expects \(4, 16, 16\)"):
        ds.check_compatible(latent_channels=4, latent_size=16)
    with pytest.raises(LatentCacheMismatch, match=r"expects \(3, 8, 8\)"):
        ds.check_compatible(latent_channels=3, latent_size=8)
    with pytest.raises(LatentCacheMismatch, match="2 classes but the model has 1000"):
        ds.check_compatible(latent_channels=4, latent_size=8, num_classes=1000)
    with pytest.raises(LatentCacheMismatch, match="scale_factor"):
        ds.check_compatible(4, 8, autoencoder_spec={**ae.to_dict(), "scale_factor": 1.0})
    with pytest.raises(LatentCacheMismatch, match="without mirrored images"):
        LatentCacheDataset(out, hflip=True)
    with pytest.raises(FileNotFoundError, match="no latents cache.*dit.cache_latents"):
        LatentCacheDataset(tmp_path / "nothing")


def test_latent_cache_compatibility_with_the_trainers_settings(image_folder, tiny_vae_dir, tmp_path, monkeypatch):
    """What the trainer checks: the configured autoencoder name (a local directory matches however
    its path is spelled) and a patch size that divides the cached latents."""
    out = build_latent_cache(image_folder, build_autoencoder(str(tiny_vae_dir)), tmp_path / "c", IMAGE_SIZE,
                             fmt=CacheFormat(flip=False), run=CacheRun(num_workers=0, device="cpu", progress=False))
    ds = LatentCacheDataset(out, hflip=False)  # latents (4, 8, 8), autoencoder named by its absolute path
    monkeypatch.chdir(tiny_vae_dir.parent)
    for name in (str(tiny_vae_dir), tiny_vae_dir.name, f"./{tiny_vae_dir.name}/"):
        ds.check_compatible(autoencoder_spec={"name": name}, patch_size=2)
    with pytest.raises(LatentCacheMismatch, match=r"differs from the configured one in name.*'sd-ema'.*vae\.name="):
        ds.check_compatible(autoencoder_spec={"name": "sd-ema"})
    with pytest.raises(LatentCacheMismatch, match="8x8 latents.*patch_size=3 does not divide"):
        ds.check_compatible(patch_size=3)


def test_cache_latents_checks_the_data_root_before_loading_the_autoencoder(tmp_path, monkeypatch):
    import dit.cli.cache_latents as cli

    monkeypatch.setattr(cli, "build_autoencoder", lambda *a, **k: pytest.fail("autoencoder loaded first"))
    cfg = cli.CacheLatentsConfig(data_root=str(tmp_path / "nope"), out_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        cli.cache_latents(cfg)
    assert not (tmp_path / "out").exists()


def test_latent_cache_shards_do_not_depend_on_the_output_path(image_folder, tmp_path):
    """Shards are saved through an open file: torch would name the zip records after a file name."""
    ae = build_autoencoder("pixel")
    kwargs = dict(fmt=CacheFormat(shard_size=4), run=CacheRun(num_workers=0, device="cpu", progress=False))
    a = build_latent_cache(image_folder, ae, tmp_path / "a", IMAGE_SIZE, **kwargs)
    b = build_latent_cache(image_folder, ae, tmp_path / "elsewhere" / "b", IMAGE_SIZE, **kwargs)
    for name in ("shard_00000.pt", "shard_00001.pt", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_cache_shard_is_refused_without_running_code(image_folder, tmp_path):
    out = build_latent_cache(image_folder, build_autoencoder("pixel"), tmp_path / "px", IMAGE_SIZE,
                             run=CacheRun(num_workers=0, device="cpu", progress=False))
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"mean": payload}, out / "shard_00000.pt")
    with pytest.raises(pickle.UnpicklingError):
        LatentCacheDataset(out, hflip=False)[0]
    assert not marker.exists()


def test_latent_items_do_not_depend_on_loader_workers(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    out = build_latent_cache(image_folder, ae, tmp_path / "c", IMAGE_SIZE,
                             run=CacheRun(num_workers=0, device="cpu", progress=False))
    ds = LatentCacheDataset(out, seed=7)
    ds.set_epoch(2)
    sampler = DistributedResumableSampler(len(ds), 1, 0, seed=7, drop_last=False)
    batches = [torch.cat([x for x, _ in DataLoader(ds, batch_size=3, sampler=sampler, num_workers=w)]) for w in (0, 2)]
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------- sampler


def _rank_orders(n, replicas, seed, epoch, start=0, **kw):
    orders = []
    for rank in range(replicas):
        s = DistributedResumableSampler(n, replicas, rank, seed, **kw)
        s.set_epoch(epoch, start)
        orders.append(list(s))
        assert len(s) == len(orders[-1])
    return orders


def test_sampler_ranks_partition_a_permutation():
    orders = _rank_orders(24, 4, seed=0, epoch=3)
    union = sorted(i for o in orders for i in o)
    assert union == list(range(24)) and all(len(o) == 6 for o in orders)
    assert _rank_orders(24, 4, seed=0, epoch=3) == orders  # same seed, same order
    assert _rank_orders(24, 4, seed=0, epoch=4) != orders  # a new order each epoch
    dropped = _rank_orders(26, 4, seed=0, epoch=0)  # drop_last: 24 distinct items
    flat = [i for o in dropped for i in o]
    assert len(flat) == 24 == len(set(flat))
    padded = _rank_orders(26, 4, seed=0, epoch=0, drop_last=False)  # wrap: all 26, 2 repeated
    flat = [i for o in padded for i in o]
    assert len(flat) == 28 and set(flat) == set(range(26))
    assert _rank_orders(6, 2, 0, 0, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_sampler_resume_mid_epoch_reproduces_the_remaining_order():
    full = _rank_orders(30, 3, seed=9, epoch=2)
    consumed_steps, global_batch = 4, 6  # 4 steps of 2 per rank
    resumed = _rank_orders(30, 3, seed=9, epoch=2, start=consumed_steps * global_batch)
    for f, r in zip(full, resumed):
        assert r == f[consumed_steps * global_batch // 3:]
    # A different number of ranks after resume still covers exactly the unseen items.
    seen = {i for o in full for i in o[: consumed_steps * global_batch // 3]}
    resumed2 = _rank_orders(30, 2, seed=9, epoch=2, start=consumed_steps * global_batch)
    assert {i for o in resumed2 for i in o} == set(range(30)) - seen
    with pytest.raises(ValueError, match="not a multiple of num_replicas"):
        DistributedResumableSampler(30, 4, 0, 9, drop_last=False).set_epoch(0, start_index=6)


# ---------------------------------------------------------------------------- cache precision


def _encoded_pair(ae, images, index):
    """The encoder's (mean, std) of item `index` and its mirror, encoded as one batch of two, as
    the builder does with batch_size=1: (2, C, h, w) each."""
    x, _ = images.load(index)
    return ae.encode_moments(torch.stack([x, x.flip(-1)]))


def test_a_new_cache_stores_the_encoders_mean_exactly_in_float32(image_folder, tiny_vae_dir, tmp_path):
    ae = build_autoencoder(str(tiny_vae_dir))
    out = build_latent_cache(image_folder, ae, tmp_path / "c", IMAGE_SIZE,  # the defaults: mean float32, std float16
                             run=CacheRun(batch_size=1, num_workers=0, device="cpu", progress=False))
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["mean_dtype"], meta["dtype"]) == ("float32", "float16")
    shard = torch.load(out / "shard_00000.pt", weights_only=True)
    assert shard["mean"].dtype == torch.float32 and shard["std"].dtype == torch.float16
    images = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    ds = LatentCacheDataset(out, hflip=True)
    for i in range(7):
        mean, std = _encoded_pair(ae, images, i)
        assert torch.equal(shard["mean"][i], mean)  # bit for bit
        assert torch.equal(shard["std"][i], std.half())
        for view in (0, 1):
            cached_mean, cached_std = ds.moments(i, flip=bool(view))
            assert torch.equal(cached_mean, mean[view]) and torch.equal(cached_std, std[view].half().float())
    with pytest.raises(ValueError, match="mean_dtype 'float8'.*float16"):
        build_latent_cache(image_folder, ae, tmp_path / "bad", IMAGE_SIZE, fmt=CacheFormat(mean_dtype="float8"),
                           run=CacheRun(num_workers=0, progress=False))


def _as_old_format(cache):
    """Rewrite meta.json as the builder wrote it before `mean_dtype` existed (the mean in `dtype`)."""
    meta = json.loads((cache / "meta.json").read_text())
    assert meta.pop("mean_dtype") == meta["dtype"] == "float16"
    (cache / "meta.json").write_text(json.dumps(meta, indent=2))


def test_an_old_float16_cache_still_reads_resumes_and_trains(image_folder, tiny_vae_dir, tmp_path, one_thread):
    from conftest import TINY_MODEL, train_config, with_overrides

    from dit.train import run_training

    ae = build_autoencoder(str(tiny_vae_dir))
    run = CacheRun(batch_size=1, num_workers=0, device="cpu", progress=False)
    old = build_latent_cache(image_folder, ae, tmp_path / "old", IMAGE_SIZE, fmt=CacheFormat(mean_dtype="float16"),
                             run=run)
    _as_old_format(old)
    ds = LatentCacheDataset(old, hflip=False, sample_posterior=False)
    images = ImageFolderDataset(image_folder, IMAGE_SIZE, hflip=False)
    for i in range(7):
        mean, std = _encoded_pair(ae, images, i)
        cached_mean, cached_std = ds.moments(i)
        assert torch.equal(cached_mean, mean[0].half().float()) and torch.equal(cached_std, std[0].half().float())
        assert torch.equal(ds[i][0], mean[0].half().float() * ae.scale_factor)
    # Rebuilding into it: the defaults are refused naming the mean's dtype; mean_dtype=float16 reuses it.
    with pytest.raises(LatentCacheMismatch, match=r"different settings \(mean_dtype\).*mean_dtype=float16 resumes"):
        build_latent_cache(image_folder, ae, old, IMAGE_SIZE, run=run)
    assert build_latent_cache(image_folder, ae, old, IMAGE_SIZE, fmt=CacheFormat(mean_dtype="float16"), run=run) == old

    cfg = train_config([*with_overrides(TINY_MODEL, "model=DiT-S/2", "model.depth=1", "vae=local"),
                        "data=latents", f"data.root={old}", "data.num_workers=0", f"vae.name={tiny_vae_dir}",
                        "global_batch_size=4", "max_steps=2", "log.every=1", "log.samples.every=0", "ckpt.every=2",
                        "name=old"])
    run_training(cfg, tmp_path / "run")
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "run" / "checkpoints" / "0000002.pt").is_file()
