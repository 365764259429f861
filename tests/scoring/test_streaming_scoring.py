"""Scoring streams its images: an ADM `.npz` is read slice by slice after its header is checked,
FID statistics are accumulated batch by batch, and the numbers equal the in-memory path's."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dit.scoring.images as S
from dit.io.images import check_images, read_image_folder
from dit.io.npz import read_samples_npz, write_samples_npz
from dit.scoring import metrics as M
from dit.cli.eval_fid import evaluate_samples
from dit.scoring.frechet import RunningMoments
from dit.scoring.inception import InceptionFeatures
from dit.scoring.judge import JudgeFeatures, ToyJudge


class PixelExtractor:
    """A numpy stand-in for Inception: nonlinear pooled-pixel features (D = 48), logits and
    spatial features, in batches of `batch_size` (as Inception's extract loop)."""

    name, identity = "pixels", "pixels-v1"

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size

    def extract(self, images, progress=False):
        x = check_images(images).astype(np.float32) / 255.0
        n, h, w, _ = x.shape
        pooled = x.reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(n, 48)
        pool = np.tanh(3 * pooled - 1.0).astype(np.float32)
        return {"pool": pool, "logits": (pool[:, :10] * 4).astype(np.float32), "spatial": pooled[:, ::2] ** 2}


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_images_reads_exactly_the_asked_slice_from_stored_and_compressed_files(tmp_path, monkeypatch):
    images = _images(23, size=8)
    stored = write_samples_npz(tmp_path / "ours.npz", images)
    np.savez(tmp_path / "numpy.npz", arr_0=images)  # numpy's own writer (zip64 extra fields)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    read_bytes = []
    real_read = S._read_exactly
    monkeypatch.setattr(S, "_read_exactly", lambda f, buf, path: (read_bytes.append(len(buf)), real_read(f, buf, path)))
    for path in (stored, tmp_path / "numpy.npz", tmp_path / "compressed.npz"):
        read_bytes.clear()
        with S.NpzImages(path) as source:
            assert source.shape == (23, 8, 8, 3) and read_bytes == []  # the header alone gave the shape
            assert source.stored == (path.name != "compressed.npz")
            for a, b in ((5, 9), (0, 3), (20, 23), (9, 9), (3, 17)):  # backwards too: the stream restarts
                before = len(read_bytes)
                np.testing.assert_array_equal(source.read(a, b), images[a:b])
                assert sum(read_bytes[before:]) == (b - a) * 8 * 8 * 3  # only the slice's bytes were read
            np.testing.assert_array_equal(np.concatenate(list(source.batches(10))), images)
            np.testing.assert_array_equal(source[-4:], images[-4:])
            with pytest.raises(IndexError, match="out of range"):
                source.read(20, 24)
    source, labels = S.open_images(write_samples_npz(tmp_path / "l.npz", images, np.arange(23) % 5))
    np.testing.assert_array_equal(labels, np.arange(23) % 5)


def test_npz_images_checks_the_header_before_reading_and_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    np.savez(tmp_path / "evil.npz", arr_0=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="without unpickling"):
        S.NpzImages(tmp_path / "evil.npz")
    with pytest.raises(ValueError, match="without unpickling"):  # the whole-file reader alike
        read_samples_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="must be uint8"):
        S.NpzImages(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        S.NpzImages(tmp_path / "nchw.npz")
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(_images(3, 4)))
    with pytest.raises(ValueError, match="Fortran .*np.ascontiguousarray"):
        S.NpzImages(tmp_path / "fortran.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no images .*arr_0"):
        S.NpzImages(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="truncated or not an .npz"):
        S.open_images(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="neither an .npz file nor a folder"):
        S.open_images(tmp_path / "missing.npz")


def test_running_moments_equal_np_cov_on_features_far_from_zero():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((1003, 37)) @ rng.standard_normal((37, 37)) * 0.01 + 300.0).astype(np.float32)
    acc = RunningMoments()
    for a, b in ((0, 1), (1, 65), (65, 500), (500, 1003)):  # uneven batches, one of a single row
        acc.update(feats[a:b])
    mu, sigma = acc.statistics()
    ref_mu, ref_sigma = feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False)
    assert np.abs(mu - ref_mu).max() <= 1e-12 * np.abs(ref_mu).max()
    assert np.abs(sigma - ref_sigma).max() <= 1e-10 * np.abs(ref_sigma).max()
    np.testing.assert_array_equal(sigma, sigma.T)
    one = RunningMoments()
    one.update(feats[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        one.statistics()
    with pytest.raises(ValueError, match="dimension changed"):
        acc.update(np.zeros((2, 5)))


def _in_memory_metrics(samples, reference_images, extractor, labels=None, **options):
    """The in-memory path: whole arrays through `extract` once, statistics by np.cov."""
    reference = M.stats_from_features(extractor.extract(reference_images), extractor.identity)
    reference.image_size = reference_images.shape[1:3]
    feats = M.sample_features(samples, extractor, labels)
    return M.metrics_from_features(feats, reference, extractor.identity, M.MetricOptions(**options),
                                   image_size=samples.shape[1:3])


def test_streamed_scoring_equals_the_in_memory_path_and_reads_one_batch_at_a_time(tmp_path, monkeypatch):
    samples, real = _images(203, seed=2), _images(150, seed=3)
    path = write_samples_npz(tmp_path / "samples.npz", samples)
    ref_path = write_samples_npz(tmp_path / "ref.npz", real)
    largest = []
    real_read = S.NpzImages.read
    monkeypatch.setattr(S.NpzImages, "read", lambda self, a, b: (largest.append(b - a), real_read(self, a, b))[1])
    extractor = PixelExtractor(batch_size=32)
    options = dict(fid=True, sfid=True, isc=True, prc=True, kid=True, kid_subsets=4, kid_subset_size=50,
                   isc_split_size=50)
    reference = M.load_reference(ref_path, extractor)
    assert max(largest) == 32  # the reference's images were streamed too
    largest.clear()
    streamed = M.compute_metrics(S.open_images(path)[0], reference, extractor, M.MetricOptions(**options))
    assert max(largest) == 32 and sum(largest) == 203
    expected = _in_memory_metrics(samples, real, extractor, **options)
    assert set(streamed) == set(expected)
    assert streamed["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert streamed["sfid"] == pytest.approx(expected["sfid"], rel=1e-9)
    for key in ("inception_score", "inception_score_std", "precision", "recall", "kid", "kid_std"):
        assert streamed[key] == expected[key], key  # the same per-image features, bit for bit
    fid_only = M.compute_metrics(S.open_images(path)[0], reference, extractor,
                                 M.MetricOptions(fid=True, sfid=False, isc=False, prc=False))
    assert set(fid_only) == {"num_samples", "num_reference", "num_reference_fid", "fid"}
    assert fid_only["fid"] == streamed["fid"]


def test_fid_of_a_stream_holds_about_one_batch_in_memory_not_the_array(tmp_path):
    samples = _images(6000, seed=4)  # 4.6 MB of pixels
    path = write_samples_npz(tmp_path / "samples.npz", samples)
    del samples
    extractor = PixelExtractor(batch_size=25)
    reference = M.compute_stats(_images(100, seed=5), extractor)
    array_bytes = 6000 * 16 * 16 * 3

    def peak(score):
        tracemalloc.start()
        try:
            score()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed = peak(lambda: M.compute_metrics(S.open_images(path)[0], reference, extractor,
                                              M.MetricOptions(sfid=False, isc=False, prc=False)))
    whole = peak(lambda: M.compute_metrics(read_samples_npz(path)[0], reference, extractor,
                                           M.MetricOptions(sfid=False, isc=False, prc=False)))
    assert whole > array_bytes  # the in-memory path holds every image
    assert streamed < array_bytes / 16, (streamed, array_bytes)  # a batch and its float copies: about 1/40


def _write_source(kind: str, images: np.ndarray, where: Path) -> Path:
    """The same images as an uncompressed .npz (ours), a compressed one (numpy's), or a PNG folder."""
    if kind == "stored":
        return write_samples_npz(where / "stored.npz", images)
    if kind == "compressed":
        np.savez_compressed(where / "compressed.npz", arr_0=images)
        return where / "compressed.npz"
    folder = where / "folder"
    for k, image in enumerate(images):
        (folder / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{k % 3}" / f"{k:04d}.png")
    return folder


@pytest.mark.parametrize("kind", ["stored", "compressed", "folder"])
def test_streamed_statistics_equal_np_cov_of_the_whole_array(tmp_path, kind):
    """mu/sigma (pool and spatial) accumulated batch by batch from a file equal the in-memory
    formula: every feature of the whole array at once, np.mean and np.cov in float64."""
    images = _images(157, seed=12)
    path = _write_source(kind, images, tmp_path)
    source, _ = S.open_images(path)
    if kind == "folder":  # the folder is read in sorted-path order: the same images, permuted
        order = [int(f.stem) for f in source.files]
        images = images[order]
    extractor = PixelExtractor(batch_size=20)  # 157 = 7 x 20 + 17: a short last batch
    streamed = M.compute_stats(source, extractor)
    feats = extractor.extract(images)
    moments = {"pool": (streamed.mu, streamed.sigma), "spatial": (streamed.mu_s, streamed.sigma_s)}
    for key, (mu, sigma) in moments.items():
        whole = feats[key].astype(np.float64)
        np.testing.assert_allclose(mu, whole.mean(0), rtol=1e-12, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(sigma, np.cov(whole, rowvar=False), rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_array_equal(streamed.pool, feats["pool"])  # kept per image for P/R and KID
    assert tuple(streamed.image_size) == (16, 16)


def test_folder_images_stream_the_files_and_match_read_image_folder(tmp_path, monkeypatch):
    images = _images(7, size=8, seed=6)
    for k, image in enumerate(images):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / f"c{k % 2}" / f"{k}.png")
    source, labels = S.open_images(tmp_path)
    assert labels is None and source.shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(np.concatenate(list(source.batches(3))), read_image_folder(tmp_path))
    Image.fromarray(_images(1, size=4)[0]).save(tmp_path / "c1" / "odd.png")
    with pytest.raises(ValueError, match="resize/crop the folder"):
        list(S.open_images(tmp_path)[0].batches(3))


def test_eval_fid_with_the_toy_judge_streams_and_equals_the_in_memory_numbers(tmp_path, compose):
    rng = np.random.default_rng(7)
    samples, real, labels = _images(1037, seed=8), _images(300, seed=9), rng.integers(0, 10, 1037)
    path = write_samples_npz(tmp_path / "samples.npz", samples, labels)
    ref = write_samples_npz(tmp_path / "ref.npz", real)
    cfg = compose("eval", overrides=[f"samples={path}", f"reference={ref}", "feature_extractor=toy_judge",
                                     f"cache_dir={tmp_path / 'cache'}", "results_table=null", "device=cpu",
                                     "metrics=[fid,isc,prc]", "isc_split_size=500"])
    metrics = evaluate_samples(cfg, cfg.samples)["metrics"]
    judge = ToyJudge.load_or_train(tmp_path / "cache", image_size=16)  # the judge it trained and cached
    extractor = JudgeFeatures(judge)
    feats = extractor.extract(samples)
    # The judge's batched single pass gives what its whole-array functions give, bit for bit.
    np.testing.assert_array_equal(feats["pool"], judge.features(samples))
    np.testing.assert_array_equal(feats["logits"], judge.logits(samples).numpy())
    expected = _in_memory_metrics(samples, real, extractor, labels, fid=True, sfid=False, isc=True, prc=True,
                                  isc_split_size=500)
    assert metrics["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    for key in ("inception_score", "inception_score_std", "precision", "recall", "class_accuracy", "num_samples"):
        assert metrics[key] == expected[key], key


@pytest.mark.slow
def test_inception_features_of_a_stream_equal_the_in_memory_path(tmp_path, random_inception):
    extractor = InceptionFeatures(random_inception, device="cpu", batch_size=3, allow_download=False)
    samples, real = _images(7, seed=10), _images(6, seed=11)  # batches of 3, 3 and 1
    path = write_samples_npz(tmp_path / "samples.npz", samples)
    reference = M.load_reference(write_samples_npz(tmp_path / "ref.npz", real), extractor)
    with torch.no_grad():
        streamed = M.compute_metrics(S.open_images(path)[0], reference, extractor,
                                     M.MetricOptions(fid=True, sfid=True, isc=True, prc=True, isc_split_size=5))
    expected = _in_memory_metrics(samples, real, extractor, fid=True, sfid=True, isc=True, prc=True, isc_split_size=5)
    assert streamed["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert streamed["sfid"] == pytest.approx(expected["sfid"], rel=1e-9)
    for key in ("inception_score", "precision", "recall"):
        assert streamed[key] == expected[key], key
