"""Reliability of the files, sampling, metrics and data side (issue 15's attacks): a weights file
swapped while it is being loaded, non-finite sampling, 16-bit images, symlink loops in an
ImageFolder, FID against a reference that does not fit, output paths that collide, concurrent
bulk samplers, atomic writes onto links and devices, and write failures that must name the file.
What each case guarantees: docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bulk_sample_with, FullDisk, compose_config, single_thread, tiny_dit, write_random_inception_weights


class _RunsShellOnLoad:
    """What an attacker plants: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------------------
# Case 2: the Inception weights file is checked, then swapped before torch-fidelity reads it
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth")


def test_inception_weights_swapped_after_the_safe_check_never_run_code(tmp_path, inception_weights, monkeypatch):
    """A real swap (os.replace of a payload onto the path) right after the first load of the file
    returns, i.e. between the weights-only check and the moment torch-fidelity would reopen it."""
    from dit.scoring import inception as I

    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    path.write_bytes(inception_weights.read_bytes())
    payload = tmp_path / "payload.pth"
    torch.save({"fc.weight": _RunsShellOnLoad(marker)}, payload)
    expected = torch.load(inception_weights, weights_only=True)

    real_load = torch.load
    swapped = []

    def load_then_swap(*args, **kwargs):
        out = real_load(*args, **kwargs)
        if not swapped:  # the attacker wins the race: the file changes after the first load
            os.replace(payload, path)
            swapped.append(True)
        return out

    monkeypatch.setattr(torch, "load", load_then_swap)
    try:
        extractor = I.InceptionFeatures(path, device="cpu", batch_size=2, allow_download=False)
    except Exception as err:  # noqa: BLE001 - first see whether the payload ran
        extractor = err
    monkeypatch.undo()

    assert swapped, "the swap did not happen: the test did not exercise the race"
    assert not marker.exists(), "the swapped-in payload ran"
    assert isinstance(extractor, I.InceptionFeatures), extractor
    state = extractor.net.state_dict()
    assert all(torch.equal(state[k].float(), v.float()) for k, v in expected.items())  # the checked weights
    assert extractor.identity == f"inception-v3-compat:{hashlib.sha256(inception_weights.read_bytes()).hexdigest()[:16]}"

    # The payload is live: a full unpickle of what is now at the path runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------------------
# Case 7: NaN/inf in sampling (settings, weights) becomes an error, never black images
# --------------------------------------------------------------------------------------


def _pixel_checkpoint(path: Path, nan_in_ema: bool = False) -> Path:
    """A tiny DiT on 8x8 pixels in our checkpoint format, recording the pixel autoencoder."""
    from dit.io.checkpoint import save_atomic

    model = tiny_dit(in_channels=3)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    if nan_in_ema:
        ema["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")  # a diverged run's EMA
    save_atomic({"model": model.state_dict(), "ema": ema, "step": 1, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "format_version": 1}, path)
    return path


def _sample(*overrides):
    return compose_config("sample", ["device=cpu", "sampler.num_steps=3", "bulk.num_samples=4", "bulk.batch_size=2", "grid.labels=[0,1]",
                                     *overrides])


def test_nonfinite_sampling_fails_naming_the_checkpoint_and_settings_and_writes_nothing(tmp_path):
    from dit.config import ConfigError
    from dit.sampling.generate import generate_bulk, generate_grid
    from dit.sampling.images import NonFiniteSamplesError, sample_images
    from dit.sampling.settings import SamplerSettings

    ckpt = _pixel_checkpoint(tmp_path / "pix.pt")
    out = tmp_path / "out" / "s.npz"
    # Settings that cannot give finite samples are refused before any work.
    for bad in (["bulk.cfg_scale=nan"], ["bulk.cfg_scale=inf"], ["sampler=ddim", "sampler.eta=nan"],
                ["sampler=ddim", "sampler.eta=100"]):
        with pytest.raises(ConfigError, match=r"(cfg_scale must be a finite number|eta must be in \[0, 1\])"):
            generate_bulk(_sample(f"checkpoint={ckpt}", "mode=bulk", f"bulk.out={out}", *bad))
        assert not out.parent.exists(), bad
    for field, value in (("cfg_scale", float("nan")), ("cfg_scale", float("inf")), ("eta", float("nan")),
                         ("eta", 1.5), ("eta", -0.1)):
        with pytest.raises(ValueError, match=field):
            SamplerSettings(sampler="ddim", **{field: value}).check()
    SamplerSettings(sampler="ddim", eta=1.0).check()  # DDPM-like noise is the upper end

    # Finite but absurd guidance overflows: an error naming the checkpoint and the settings.
    with pytest.raises(NonFiniteSamplesError, match=rf"checkpoint {ckpt} .*non-finite latents .*cfg_scale=1e\+30"):
        generate_bulk(_sample(f"checkpoint={ckpt}", "mode=bulk", f"bulk.out={out}", "bulk.cfg_scale=1e30",
                              "sampler.clip_denoised=false"))  # clipping x0 (pixel default) would bound it
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no .npz, no .json, no .parts folder

    # NaN in the EMA weights (a diverged run's checkpoint): refused at load, for grids and bulk files.
    diverged = _pixel_checkpoint(tmp_path / "diverged.pt", nan_in_ema=True)
    for mode, run in (("bulk", generate_bulk), ("grid", generate_grid)):
        with pytest.raises(NonFiniteSamplesError, match=rf"checkpoint {diverged}: its ema weights hold 1 non-finite"):
            run(_sample(f"checkpoint={diverged}", f"mode={mode}", f"bulk.out={out}",
                        f"grid.out={tmp_path / 'out' / 'g.png'}"))
    assert not out.parent.exists() or not any(out.parent.iterdir())
    generate_grid(_sample(f"checkpoint={diverged}", "mode=grid", "which=model", f"grid.out={tmp_path / 'g.png'}"))

    # A model in memory with NaN weights (no checkpoint): the batch's end check catches it.
    model = tiny_dit(in_channels=3)
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = float("nan")
    from dit.autoencoder import build_autoencoder

    with pytest.raises(NonFiniteSamplesError, match=r"non-finite latents \(NaN/inf\) in 2 of 2 samples"):
        sample_images(model, None, build_autoencoder("pixel"), torch.tensor([0, 1]),
                      SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=1.0), noise=torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------------------
# Case 9: 16-bit greyscale images are scaled to 8 bits, not clipped to white
# --------------------------------------------------------------------------------------


def test_a_16_bit_greyscale_png_reads_as_its_8_bit_values_in_training_data_and_fid_folders(tmp_path):
    from PIL import Image

    from dit.data.images import ImageFolderDataset, load_rgb
    from dit.io.images import read_image_folder

    grey8 = (np.arange(256).reshape(16, 16)).astype(np.uint8)  # every 8-bit level
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(grey8.astype(np.uint16) * 257).save(root / "a" / "wide.png")  # 16-bit PNG, v * 257
    Image.fromarray(grey8, mode="L").convert("RGB").save(root / "b" / "narrow.png")
    assert Image.open(root / "a" / "wide.png").mode.startswith("I")  # really 16 bits on disk

    rgb = np.asarray(load_rgb(root / "a" / "wide.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb, np.repeat(grey8[..., None], 3, axis=-1))  # not 255 everywhere

    ds = ImageFolderDataset(root, image_size=16, hflip=False)
    (x_wide, _), (x_narrow, _) = ds[0], ds[1]
    assert torch.equal(x_wide, x_narrow)  # the same picture in 16 and 8 bits trains the same

    images = read_image_folder(root)  # what eval_fid.py reads from a folder of images
    assert np.array_equal(images[0], images[1])

    # 16-bit values are scaled with rounding (65535 -> 255, 128 -> 0, 129 -> 1).
    Image.fromarray(np.array([[0, 128, 129, 65535]], np.uint16)).save(tmp_path / "edge.png")
    assert np.asarray(load_rgb(tmp_path / "edge.png"))[0, :, 0].tolist() == [0, 0, 1, 255]


# --------------------------------------------------------------------------------------
# Case 5: symlink loops and cross-links in an ImageFolder
# --------------------------------------------------------------------------------------


def _toy_folder(root: Path, classes=("a", "b", "c"), per_class: int = 2) -> dict[str, int]:
    """root/<class>/<i>.png, each image a distinct solid colour; returns {real path: label}."""
    from PIL import Image

    labels = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            Image.new("RGB", (8, 8), (40 * label, 10 * i, 0)).save(path)
            labels[os.path.realpath(path)] = label
    return labels


def test_a_symlink_loop_in_an_image_folder_neither_multiplies_images_nor_mislabels_them(tmp_path):
    from torchvision.datasets import ImageFolder

    from dit.data.images import ImageFolderDataset, index_image_folder

    plain = tmp_path / "plain"
    _toy_folder(plain)
    (plain / "b" / "nested" / "deeper").mkdir(parents=True)
    (plain / "b" / "nested" / "deeper" / "x.png").write_bytes((plain / "b" / "0.png").read_bytes())
    reference = ImageFolder(str(plain), allow_empty=True)  # without links: exactly torchvision's index
    assert index_image_folder(plain) == (reference.classes, reference.samples)

    root = tmp_path / "data"
    truth = _toy_folder(root)
    os.symlink("..", root / "a" / "loop")  # a/loop -> the root: torchvision walks it ~40 times deep
    os.symlink(".", root / "c" / "self")  # c/self -> c
    os.symlink("../b", root / "a" / "tob")  # into another class
    os.symlink("0.png", root / "c" / "again.png")  # the same image twice
    with pytest.warns(UserWarning) as caught:
        ds = ImageFolderDataset(root, image_size=8, hflip=False)
    messages = " | ".join(str(w.message) for w in caught)
    for link in ("a/loop", "c/self", "a/tob", "c/again.png"):
        assert str(root / link) in messages, (link, messages)
    assert len(ds) == len(truth) == 6  # each image once
    assert sorted(os.path.realpath(p) for p, _ in ds.samples) == sorted(truth)
    assert all(truth[os.path.realpath(p)] == y for p, y in ds.samples)  # every image keeps its own class

    # A link to images outside the data set (data on another disk) is still followed.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "z.png").write_bytes((root / "a" / "0.png").read_bytes())
    os.symlink(outside, root / "b" / "more")
    with pytest.warns(UserWarning, match="not indexing"):  # the links above, again
        ds = ImageFolderDataset(root, image_size=8, hflip=False)
    assert (str(root / "b" / "more" / "z.png"), 1) in ds.samples and len(ds) == 7


# --------------------------------------------------------------------------------------
# Case 12: FID against a reference that does not fit (resolution, a broken covariance)
# --------------------------------------------------------------------------------------


class _PoolingFeatures:
    """Cheap features that exist at any resolution (2x2 average pooling): a size mismatch is not
    caught by the network, only by our check."""

    name = identity = "pooling-2x2"

    def extract(self, images, progress=False):
        x = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255.0
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).double().numpy()}


def test_fid_refuses_a_reference_at_another_resolution_or_with_a_covariance_that_is_not_psd(tmp_path,
                                                                                         inception_weights):
    import dit.scoring.metrics as M
    from dit.cli.eval_fid import evaluate_samples
    from dit.io.npz import write_npz_atomic, write_samples_npz

    rng = np.random.default_rng(0)
    samples16 = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    ref32 = write_samples_npz(tmp_path / "ref32.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    ex = _PoolingFeatures()
    mismatch = r"samples are 16x16 but the images of reference .*ref32.npz are 32x32: .*sample at the reference's"
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # computed, then cached statistics (meta)
        reference = M.load_reference(ref32, ex, cache_dir=cache)
        with pytest.raises(ValueError, match=mismatch):
            M.compute_metrics(samples16, reference, ex, M.MetricOptions(isc=False, prc=False))
    # An ADM-style batch (mu/sigma plus images) knows its resolution from its images.
    stats = M.compute_stats(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), ex)
    write_npz_atomic(tmp_path / "adm32.npz", {"arr_0": np.zeros((3, 32, 32, 3), np.uint8), "mu": stats.mu,
                                              "sigma": stats.sigma})
    inception_like = _PoolingFeatures()
    inception_like.name = "inception"
    with pytest.raises(ValueError, match="samples are 16x16 but the images of reference .*adm32.npz are 32x32"):
        M.compute_metrics(samples16, M.load_reference(tmp_path / "adm32.npz", inception_like, need_features=False),
                          inception_like, M.MetricOptions(isc=False, prc=False))
    same = M.compute_metrics(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), M.load_reference(ref32, ex), ex,
                             M.MetricOptions(isc=False, prc=False))
    assert same["fid"] > 0  # the same resolution is scored

    # Through eval_fid.py, with the real Inception network (which would resize anything to 299).
    samples_file = write_samples_npz(tmp_path / "s16.npz", samples16)
    cfg = compose_config("eval", [f"samples={samples_file}", f"reference={ref32}", "device=cpu",
                                  f"feature_extractor_weights={inception_weights}", "allow_download=false",
                                  "cache_dir=null", "results_table=null", "metrics=[fid]"])
    with pytest.raises(ValueError, match=mismatch):
        evaluate_samples(cfg, cfg.samples)
    assert not (tmp_path / "s16.inception.metrics.json").exists()

    # A covariance that is not PSD (smallest eigenvalue -2) or not symmetric is refused, naming the file.
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    broken = (q * np.linspace(-2.0, 10.0, 12)) @ q.T
    write_npz_atomic(tmp_path / "not_psd.npz", {"mu": np.zeros(12), "sigma": broken})
    with pytest.raises(ValueError, match=r"reference .*not_psd.npz: sigma is not positive semi-definite "
                                         r"\(smallest eigenvalue -2.*recompute its statistics"):
        M.compute_metrics(samples16, M.load_reference(tmp_path / "not_psd.npz", inception_like), inception_like,
                          M.MetricOptions(isc=False, prc=False))
    skew = stats.sigma + np.triu(np.full((12, 12), 1e-2 * np.abs(stats.sigma).max()), 1)
    write_npz_atomic(tmp_path / "skew.npz", {"mu": stats.mu, "sigma": skew})
    with pytest.raises(ValueError, match=r"reference .*skew.npz: sigma is not symmetric"):
        M.compute_metrics(samples16, M.load_reference(tmp_path / "skew.npz", inception_like), inception_like,
                          M.MetricOptions(isc=False, prc=False))
    with pytest.raises(ValueError, match="second set: sigma is not positive semi-definite"):
        M.frechet_distance(np.zeros(12), np.eye(12), np.zeros(12), broken)


# --------------------------------------------------------------------------------------
# Cases 10 and 11: output paths that collide; two bulk samplers on one output
# --------------------------------------------------------------------------------------


def test_an_output_path_never_collides_with_its_settings_file_and_grids_and_bulk_files_keep_their_own(tmp_path):
    from dit.autoencoder import build_autoencoder
    from dit.io.checkpoint import load_dit_checkpoint
    from dit.config import ConfigError
    from dit.sampling.generate import generate_bulk, generate_grid
    from dit.sampling.loading import settings_path_for
    from dit.sampling.settings import SamplerSettings

    ckpt = _pixel_checkpoint(tmp_path / "pix.pt")
    out = tmp_path / "out"
    for mode, key, bad, fix in (("bulk", "bulk.out", "X.json", "X.npz"), ("grid", "grid.out", "X.json", "X.png"),
                                ("grid", "grid.out", "X.npz", "X.png")):
        with pytest.raises(ConfigError, match=rf"{key}=.*{bad} must end in \.{fix[-3:]} .*use {key}=.*{fix}"):
            (generate_bulk if mode == "bulk" else generate_grid)(
                _sample(f"checkpoint={ckpt}", f"mode={mode}", f"{key}={out / bad}"))
        assert not out.exists()
    model, _ = load_dit_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"bulk output .*X.json must end in .npz"):
        bulk_sample_with(model, None, build_autoencoder("pixel"), out / "X.json", SamplerSettings(num_steps=2),
                    num_samples=2, seed=0, batch_size=2, progress=False)
    assert not out.exists()

    # A grid and a bulk file of one stem: two settings files, each describing its own output.
    grid = generate_grid(_sample(f"checkpoint={ckpt}", "mode=grid", f"grid.out={out / 'run.png'}",
                                 "grid.cfg_scale=4.0"))
    bulk = generate_bulk(_sample(f"checkpoint={ckpt}", "mode=bulk", f"bulk.out={out / 'run.npz'}",
                                 "bulk.cfg_scale=1.5"))
    assert settings_path_for(grid) != settings_path_for(bulk)
    assert settings_path_for(bulk) == out / "run.json"  # where eval_fid.py (and existing files) have it
    grid_settings = json.loads(settings_path_for(grid).read_text())
    bulk_settings = json.loads(settings_path_for(bulk).read_text())
    assert (grid_settings["mode"], grid_settings["cfg_scale"]) == ("grid", 4.0)
    assert (bulk_settings["num_samples"], bulk_settings["cfg_scale"], bulk_settings["labels"]) == (4, 1.5, "uniform")


@pytest.mark.slow
def test_a_second_bulk_sampler_on_the_same_output_fails_at_once_naming_the_holder(tmp_path):
    import multiprocessing
    import signal
    import time

    from dit.sampling.bulk import BulkOutputBusyError
    from dit.sampling.generate import generate_bulk

    ckpt = _pixel_checkpoint(tmp_path / "pix.pt")
    out = tmp_path / "b.npz"
    parts = tmp_path / "b.npz.parts"
    cfg = _sample(f"checkpoint={ckpt}", "mode=bulk", f"bulk.out={out}", "bulk.num_samples=400", "sampler=ddim",
                  "sampler.num_steps=10")

    def first():
        torch.set_num_threads(1)
        generate_bulk(cfg)

    with single_thread():
        proc = multiprocessing.get_context("fork").Process(target=first)
        proc.start()
        try:
            deadline = time.monotonic() + 120
            while not list(parts.glob("shard-*.npz")):
                assert proc.is_alive() and time.monotonic() < deadline, "the first sampler did not start"
                time.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(BulkOutputBusyError, match=rf"another bulk sampler is writing {out} .*pid {proc.pid} "
                                                          rf"on .*wait for it to finish.*or choose another output"):
                generate_bulk(cfg)
            assert time.monotonic() - started < 10  # at once, not after sampling
            assert proc.is_alive()  # the first one is untouched
            os.kill(proc.pid, signal.SIGKILL)  # ... and killed: its lock goes with it
            proc.join(60)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.npz.parts", "pix.pt"]
        assert generate_bulk(cfg) == out  # the relaunch takes the lock and finishes
    assert out.is_file() and not parts.exists()


# --------------------------------------------------------------------------------------
# Case 13: atomic writes onto symlinks, devices and FIFOs
# --------------------------------------------------------------------------------------


def test_atomic_writes_go_through_a_symlink_and_never_replace_what_is_not_a_regular_file(tmp_path):
    from dit.scoring.table import append_results_row
    from dit.io.atomic import write_text_atomic
    from dit.io.npz import write_npz_atomic

    bigger_disk = tmp_path / "bigger_disk"
    bigger_disk.mkdir()
    (bigger_disk / "results.json").write_text("old\n")
    link = tmp_path / "results.json"
    os.symlink(bigger_disk / "results.json", link)
    assert write_text_atomic(link, "new\n") == link
    assert link.is_symlink() and (bigger_disk / "results.json").read_text() == "new\n"  # still a link
    dangling = tmp_path / "samples.npz"
    os.symlink(bigger_disk / "samples.npz", dangling)  # a link to a file still to be made
    write_npz_atomic(dangling, {"arr_0": np.zeros((1, 2, 2, 3), np.uint8)})
    assert dangling.is_symlink() and (bigger_disk / "samples.npz").is_file()
    assert sorted(p.name for p in bigger_disk.iterdir()) == ["results.json", "samples.npz"]  # no temp files
    table_link = tmp_path / "table.csv"
    os.symlink(bigger_disk / "table.csv", table_link)
    append_results_row(table_link, {"fid": 1.0})
    assert table_link.is_symlink() and "fid" in (bigger_disk / "table.csv").read_text()

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    os.symlink(os.devnull, tmp_path / "to_null")
    for target in (fifo, tmp_path / "folder", tmp_path / "to_null"):
        with pytest.raises(FileExistsError, match=r"refusing to write .*: it exists and is .*choose another path"):
            write_text_atomic(target, "x")
    with pytest.raises(FileExistsError, match="not a regular file"):
        append_results_row(fifo, {"fid": 1.0})
    assert fifo.exists() and not fifo.is_file() and (tmp_path / "folder").is_dir()
    assert (tmp_path / "to_null").is_symlink() and os.path.exists(os.devnull) and not Path(os.devnull).is_file()


# --------------------------------------------------------------------------------------
# Case 14: write failures outside checkpoints name the file and the fix
# --------------------------------------------------------------------------------------


def _open_on_a_full_disk(match: str, room: int = 64):
    def opener(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FullDisk(f, room) if match in str(path) and ("w" in mode or "a" in mode or "x" in mode) else f

    return opener


def test_write_failures_outside_checkpoints_name_the_file_and_the_fix(tmp_path, monkeypatch):
    import dit.data.cache
    import dit.scoring.table
    import dit.io.npz
    from PIL import Image

    from dit.autoencoder import build_autoencoder
    from dit.data import CacheFormat, CacheRun, build_latent_cache
    from dit.data.latents import LatentCacheDataset
    from dit.scoring.table import append_results_row
    from dit.io.atomic import FileWriteError
    from dit.io.npz import write_samples_npz

    def assert_names(err, path):
        message = str(err.value)
        assert f"could not write {path}" in message and "No space left on device (errno 28)" in message, message
        assert "free space or fix permissions" in message and err.value.errno == errno.ENOSPC

    # A latents cache shard on a full disk: not torch's opaque zip error.
    images = tmp_path / "images"
    for i in range(4):
        (images / ("a" if i < 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(images / ("a" if i < 2 else "b") / f"{i}.png")
    cache = tmp_path / "cache"
    kwargs = dict(fmt=CacheFormat(dtype="float32", shard_size=2),
                  run=CacheRun(batch_size=2, num_workers=0, device="cpu", progress=False))
    monkeypatch.setattr(dit.data.cache, "open", _open_on_a_full_disk("shard_00001"), raising=False)
    with pytest.raises(FileWriteError) as err:
        build_latent_cache(images, build_autoencoder("pixel"), cache, 8, **kwargs)
    assert_names(err, cache / "shard_00001.pt")
    assert sorted(p.name for p in cache.iterdir()) == ["build.json", "shard_00000.pt"]  # no temp file
    monkeypatch.undo()
    build_latent_cache(images, build_autoencoder("pixel"), cache, 8, **kwargs)  # space freed: resumes

    # A truncated meta.json: named, with the way to rebuild it.
    meta = cache / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{meta} is not valid JSON .*truncated or corrupt; delete it and rerun"):
        LatentCacheDataset(cache)
    with pytest.raises(ValueError, match=rf"{meta} is not valid JSON"):
        build_latent_cache(images, build_autoencoder("pixel"), cache, 8, **kwargs)
    meta.unlink()  # ... as the message says
    build_latent_cache(images, build_autoencoder("pixel"), cache, 8, **kwargs)
    assert len(LatentCacheDataset(cache)) == 4

    # A sample file (bulk assembly, shards, statistics: all written by write_npz_atomic).
    out = tmp_path / "samples.npz"
    monkeypatch.setattr(dit.io.npz, "open", _open_on_a_full_disk("samples.npz"), raising=False)
    with pytest.raises(FileWriteError) as err:
        write_samples_npz(out, np.zeros((4, 8, 8, 3), np.uint8))
    assert_names(err, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".samples")]
    monkeypatch.undo()

    # The results table.
    table = tmp_path / "results.csv"
    append_results_row(table, {"fid": 1.0})
    monkeypatch.setattr(dit.scoring.table, "open", _open_on_a_full_disk("results.csv", room=0), raising=False)
    with pytest.raises(FileWriteError) as err:
        append_results_row(table, {"fid": 2.0})
    assert_names(err, table)
    assert "The rows already in it are kept" in str(err.value)


def test_a_non_utf8_byte_in_metrics_jsonl_never_blocks_resume(tmp_path):
    """Resume truncates metrics.jsonl to the resumed step; a line with a byte that is not UTF-8
    (a flipped bit, a foreign write) is dropped like a cut-short line, not a UnicodeDecodeError."""
    from dit.train.report import _truncate_metrics

    metrics = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3)]
    broken = json.dumps({"step": 2, "train/loss": 0.5}).encode().replace(b"0.5", b"0.\xff5")
    metrics.write_bytes(b"\n".join([good[0].encode(), broken, good[1].encode(), good[2].encode(), b'{"step": 4']))
    _truncate_metrics(metrics, step=2)
    assert metrics.read_text(encoding="utf-8") == good[0] + "\n" + good[1] + "\n"
