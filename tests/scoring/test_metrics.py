"""Metrics: the Fréchet distance against closed forms and scipy, the ADM .npz format, IS and
precision/recall on known inputs, reference statistics and their cache, torch-fidelity's
InceptionV3 run offline from a random weights file made here, and the eval_fid.py entry point."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from dit.io.images import check_images
from dit.io.npz import StreamedArray, read_samples_npz, write_npz_atomic, write_samples_npz
from dit.scoring import inception as I
from dit.scoring import metrics as M
from dit.scoring.extractors import build_feature_extractor


# ------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.slow
def test_frechet_distance_equals_the_closed_form_for_isotropic_gaussians():
    d = 2048
    value = M.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), 4 * np.eye(d))
    # ||0 - 1||^2 + tr(I) + tr(4I) - 2 tr(2I) = 2048 + 2048 + 8192 - 8192
    assert abs(value - 4096.0) <= 1e-9 * 4096.0


def test_frechet_distance_equals_the_closed_form_for_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    d = 256
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = M.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert abs(value - expected) <= 1e-9 * expected


def test_frechet_distance_matches_scipy_sqrtm_and_torch_fidelity_on_feature_sets():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    d = 64
    x = rng.standard_normal((500, d)) @ rng.standard_normal((d, d)) * 0.3
    y = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2
    (mu1, s1), (mu2, s2) = M.feature_statistics(x), M.feature_statistics(y)
    covmean = linalg.sqrtm(s1 @ s2)
    independent = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - independent) <= 1e-6 * independent
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert abs(ours - tf["frechet_inception_distance"]) <= 1e-6 * ours


def test_frechet_distance_of_a_set_with_itself_is_zero_even_with_singular_covariance():
    x = np.random.default_rng(2).standard_normal((40, 256)) * 5  # 40 points in 256-d: rank-39 covariance
    mu, sigma = M.feature_statistics(x)
    value = M.frechet_distance(mu, sigma, mu, sigma.astype(np.float32))  # float32 sigma as torch-fidelity makes
    assert value == 0.0 or 0.0 < value < 1e-8 * np.trace(sigma)
    # Rounding noise in the 216-dimensional null space limits the absolute accuracy to ~1e-7 of the trace.
    assert abs(M.frechet_distance(mu, sigma, mu + 1.0, sigma) - 256.0) < 1e-6 * 2 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_or_broken_statistics():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"mu must be \(D,\) and sigma \(D, D\)"):
        M.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        M.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2 images"):
        M.feature_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------ files


def test_samples_npz_is_the_adm_format_and_byte_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = write_samples_npz(tmp_path / "s.npz", images, labels)
    with np.load(path) as data:  # what ADM's evaluator reads
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 6, 7, 3)
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    first = path.read_bytes()
    write_samples_npz(tmp_path / "s.npz", images, torch.tensor(labels))
    assert path.read_bytes() == first  # no timestamps inside
    back, back_labels = read_samples_npz(path)
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)
    # Streaming the same array in chunks writes the same bytes.
    write_npz_atomic(tmp_path / "t.npz", {"arr_0": StreamedArray(images.shape, np.dtype(np.uint8),
                                                                     [images[:2], images[2:]]),
                                            "arr_1": labels.astype(np.int64)})
    assert (tmp_path / "t.npz").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_bad_sample_files_fail_with_clear_messages(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_samples_npz(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels last"):
        write_samples_npz(tmp_path / "f.npz", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="one label per image"):
        write_samples_npz(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.uint8), [1, 2, 3])
    np.savez(tmp_path / "nope.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        read_samples_npz(tmp_path / "nope.npz")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="truncated or not an .npz"):
        read_samples_npz(tmp_path / "trunc.npz")


# ------------------------------------------------------------------------------ IS, precision/recall, KID


def test_inception_score_of_one_hot_predictions_over_k_classes_is_k():
    k, n = 10, 200
    logits = 60.0 * np.eye(k)[np.arange(n) % k]  # softmax is one-hot to ~1e-26
    mean, std = M.inception_score(logits, split_size=100)  # two splits, each balanced
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert M.inception_score(60.0 * np.eye(k)[np.zeros(n, int)])[0] == pytest.approx(1.0, rel=1e-9)


def test_precision_and_recall_of_a_set_against_itself_are_one():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 32))
    assert M.precision_recall(x, x) == (1.0, 1.0)
    far = x + 100.0
    assert M.precision_recall(x, far) == (0.0, 0.0)
    # Half the generated samples on the real manifold, half far away: precision 1/2; they cover
    # only the real points near them, so recall is strictly between 0 and 1.
    half = np.concatenate([x[:150], far[150:]])
    precision, recall = M.precision_recall(x, half)
    assert precision == 0.5 and 0.0 < recall < 1.0


def test_kid_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same, _ = M.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = M.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 and shifted > 0.2


# ------------------------------------------------------------------------------ reference statistics


class CountingExtractor:
    """Cheap deterministic features (2x2 average pooling of the pixels), counting calls."""

    name = "pixels"

    def __init__(self, identity="pixels-v1"):
        self.identity = identity
        self.calls = 0

    def extract(self, images, progress=False):
        self.calls += 1
        x = torch.from_numpy(check_images(images)).float().permute(0, 3, 1, 2) / 255.0
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).double().numpy()}


def test_reference_statistics_cache_is_keyed_by_extractor_and_file(tmp_path):
    rng = np.random.default_rng(5)
    ref = write_samples_npz(tmp_path / "ref.npz", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    cache = tmp_path / "cache"
    ex = CountingExtractor()
    first = M.load_reference(ref, ex, cache_dir=cache)
    second = M.load_reference(ref, ex, cache_dir=cache)
    assert ex.calls == 1 and first.num_images == 30  # the second came from the cache
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.pool, second.pool)
    other = CountingExtractor("pixels-v2")  # other weights: never the cached statistics
    M.load_reference(ref, other, cache_dir=cache)
    assert other.calls == 1
    write_samples_npz(ref, rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))  # same name, new N
    assert M.load_reference(ref, ex, cache_dir=cache).num_images == 20 and ex.calls == 2


def test_statistics_from_another_extractor_are_not_used(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    stats = M.compute_stats(images, CountingExtractor("A"))
    M.save_stats(tmp_path / "a_only.npz", stats, include_features=False)
    with pytest.raises(ValueError, match="no mu/sigma usable with the B extractor"):
        M.load_reference(tmp_path / "a_only.npz", CountingExtractor("B"))
    # With images in the file, B recomputes its own statistics from them.
    write_npz_atomic(tmp_path / "both.npz", {"arr_0": images, "mu": stats.mu, "sigma": stats.sigma,
                                               "meta": np.array(json.dumps({"extractor": "A"}))})
    b = CountingExtractor("B")
    assert M.load_reference(tmp_path / "both.npz", b).extractor == "B" and b.calls == 1


def test_an_adm_reference_batch_gives_its_stored_statistics_and_its_images_for_precision_recall(tmp_path):
    """ADM's evaluator takes mu/sigma from the reference file when present (its images serve
    precision/recall only); ADM files carry no metadata, so they are trusted for Inception only."""
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    stored_mu, stored_sigma = np.full(12, 0.5), 2.0 * np.eye(12)  # deliberately not the images' statistics
    write_npz_atomic(tmp_path / "VIRTUAL_ref.npz", {"arr_0": images, "mu": stored_mu, "sigma": stored_sigma})
    inception_like = CountingExtractor()
    inception_like.name = "inception"
    ref = M.load_reference(tmp_path / "VIRTUAL_ref.npz", inception_like)
    np.testing.assert_array_equal(ref.mu, stored_mu)
    np.testing.assert_array_equal(ref.sigma, stored_sigma)
    assert ref.pool.shape == (10, 12) and ref.num_images == 10 and inception_like.calls == 1
    stats_only = M.load_reference(tmp_path / "VIRTUAL_ref.npz", CountingExtractor(), need_features=False)
    assert not np.array_equal(stats_only.mu, stored_mu)  # another extractor: recomputed from the images
    write_npz_atomic(tmp_path / "stats_only.npz", {"mu": stored_mu, "sigma": stored_sigma})
    ref = M.load_reference(tmp_path / "stats_only.npz", inception_like)
    with pytest.warns(UserWarning, match="need reference images"):
        out = M.compute_metrics(images, ref, inception_like)
    assert "fid" in out and "precision" not in out


# ------------------------------------------------------------------------------ Inception, offline


def _toy_sets(n=5, size=16, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) // 2 + rng.integers(0, 60, real.shape), 0, 255).astype(np.uint8)
    return real, fake


@pytest.mark.slow
def test_fid_against_adm_statistics_equals_fid_against_the_same_reference_as_images(tmp_path, random_inception):
    from PIL import Image

    extractor = I.InceptionFeatures(random_inception, device="cpu", batch_size=8, allow_download=False)
    real, fake = _toy_sets()
    feats = M.sample_features(fake, extractor)
    assert feats["pool"].shape == (5, 2048) and feats["logits"].shape == (5, 1008)
    assert feats["spatial"].shape == (5, 17 * 17 * 7)  # ADM's sFID features
    assert np.isfinite(feats["pool"]).all() and feats["pool"].std() > 1e-3

    as_images = M.load_reference(write_samples_npz(tmp_path / "ref_images.npz", real), extractor)
    # An ADM reference batch: mu/sigma (float64) and mu_s/sigma_s, no metadata, no images.
    write_npz_atomic(tmp_path / "ref_stats.npz", {"mu": as_images.mu, "sigma": as_images.sigma,
                                                    "mu_s": as_images.mu_s, "sigma_s": as_images.sigma_s})
    as_stats = M.load_reference(tmp_path / "ref_stats.npz", extractor, need_features=False)
    folder = tmp_path / "ref_folder"
    folder.mkdir()
    for i, img in enumerate(real):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    as_folder = M.load_reference(folder, extractor)

    options = M.MetricOptions(isc=False, prc=False)
    by_images = M.metrics_from_features(feats, as_images, extractor.identity, options)
    by_stats = M.metrics_from_features(feats, as_stats, extractor.identity, options)
    by_folder = M.metrics_from_features(feats, as_folder, extractor.identity, options)
    assert by_images["fid"] > 0 and by_images["sfid"] > 0
    for key in ("fid", "sfid"):
        assert abs(by_stats[key] - by_images[key]) <= 1e-6 * by_images[key]
        assert abs(by_folder[key] - by_images[key]) <= 1e-6 * by_images[key]


def test_missing_inception_weights_offline_name_the_file_to_provide(tmp_path, monkeypatch):
    with pytest.raises(I.FeatureExtractorUnavailable, match=I.INCEPTION_WEIGHTS_FILE) as err:
        I.InceptionFeatures(tmp_path / "nowhere.pth")
    assert "feature_extractor_weights=" in str(err.value) and I.INCEPTION_WEIGHTS_URL in str(err.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(I.FeatureExtractorUnavailable, match="downloads are off"):
        I.resolve_inception_weights(None, allow_download=False)
    monkeypatch.setattr(I, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(I.FeatureExtractorUnavailable, match=f"network is unreachable.*{I.INCEPTION_WEIGHTS_FILE}"):
        I.resolve_inception_weights(None, allow_download=True)


def test_a_weights_file_that_would_run_code_is_refused_before_torch_fidelity_loads_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        I.InceptionFeatures(bad)
    assert not marker.exists()


@pytest.mark.slow
def test_eval_fid_entry_point_prints_writes_json_and_appends_a_results_row(tmp_path, random_inception, capsys,
                                                                           compose):
    from dit.cli.eval_fid import evaluate_samples as evaluate  # what eval_fid.py runs
    from dit.sampling.loading import settings_path_for

    real, fake = _toy_sets(n=6, seed=1)
    ref = write_samples_npz(tmp_path / "ref.npz", real)
    samples = write_samples_npz(tmp_path / "samples.npz", fake, labels=np.arange(6) % 3)
    settings_path_for(samples).write_text(json.dumps({"checkpoint": "/runs/x/0400000.pt", "step": 400000,
                                                      "sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5}))
    table = tmp_path / "results.csv"
    overrides = [f"samples={samples}", f"reference={ref}", f"feature_extractor_weights={random_inception}",
                 "allow_download=false", f"cache_dir={tmp_path / 'cache'}", f"results_table={table}", "device=cpu",
                 "metrics=[fid,sfid,isc,prc,kid]", "kid_subset_size=3", "kid_subsets=5"]
    cfg = compose("eval", overrides=overrides)
    first = evaluate(cfg, cfg.samples)
    second = evaluate(cfg, cfg.samples)  # reference statistics now come from the cache
    assert first["metrics"] == second["metrics"]
    metrics = first["metrics"]
    assert set(metrics) >= {"fid", "sfid", "inception_score", "precision", "recall", "kid"}
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and metrics["num_samples"] == 6
    assert "fid" in capsys.readouterr().out
    record = json.loads((tmp_path / "samples.inception.metrics.json").read_text())
    assert record["metrics"]["fid"] == metrics["fid"] and record["sampling"]["step"] == 400000
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["step"] == "400000" and rows[0]["sampler"] == "ddpm"
    assert float(rows[0]["fid"]) == pytest.approx(metrics["fid"], rel=1e-5)
    assert rows[0]["feature_extractor"].startswith("inception-v3-compat:")


def test_the_toy_judge_plugs_in_as_a_feature_extractor_with_class_accuracy():
    from dit.scoring.judge import JudgeFeatures, JudgeNet, JudgeSettings, ToyJudge

    torch.manual_seed(0)
    judge = ToyJudge(JudgeNet(width=4), JudgeSettings(image_size=8, width=4))  # untrained: plumbing only
    extractor = JudgeFeatures(judge)
    rng = np.random.default_rng(7)
    real = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    fake = rng.integers(0, 128, (12, 8, 8, 3), dtype=np.uint8)
    reference = M.compute_stats(real, extractor)
    predicted = judge.classify(fake)
    out = M.compute_metrics(fake, reference, extractor, M.MetricOptions(prc=False), labels=predicted)
    assert out["class_accuracy"] == 1.0 and out["fid"] > 0 and 1.0 <= out["inception_score"] <= 10.0
    wrong = M.compute_metrics(fake, reference, extractor, M.MetricOptions(prc=False), labels=(predicted + 1) % 10)
    assert wrong["class_accuracy"] == 0.0 and wrong["fid"] == out["fid"]
    with pytest.raises(ValueError, match="image size"):
        build_feature_extractor("toy_judge")
    with pytest.raises(ValueError, match="unknown feature_extractor"):
        build_feature_extractor("clip")


def test_a_results_table_from_before_a_new_column_is_migrated_not_refused(tmp_path):
    import csv

    from dit.scoring.table import RESULTS_COLUMNS, append_results_row

    old_columns = [c for c in RESULTS_COLUMNS if c != "eta"]  # the table as written before `eta` was a column
    table = tmp_path / "results.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old_columns)
        w.writerow(["2026-01-01T00:00:00" if c == "time" else "12.5" if c == "fid" else "" for c in old_columns])
    append_results_row(table, {"fid": 3.25, "eta": 0.5, "sampler": "ddim"})
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULTS_COLUMNS)
    assert [r["fid"] for r in rows] == ["12.5", "3.25"] and [r["eta"] for r in rows] == ["", "0.5"]
    assert rows[0]["time"] == "2026-01-01T00:00:00" and rows[1]["sampler"] == "ddim"

    alien = tmp_path / "alien.csv"
    alien.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match=r"columns \['name', 'score'\] that this code does not write"):
        append_results_row(alien, {"fid": 1.0})
    assert alien.read_text() == "name,score\nx,1\n"
