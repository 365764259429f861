"""The scoring protocol (issue 12): Inception features in IEEE float32 whatever torch's TF32 flags
were (and the choice recorded), precision/recall in ADM's float16 arithmetic against an
independent numpy computation, which reference data each metric used, and results tables from
before these columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from dit.io.images import check_images
from dit.io.npz import write_npz_atomic, write_samples_npz
from dit.scoring import inception as I
from dit.scoring import metrics as M
from dit.scoring import precision_recall as PR
from dit.config import ConfigError, to_eval_config
from dit.sampling.precision import backend_flags


@pytest.fixture
def tf32_globally_on():
    """TF32 switched on for matmuls and cuDNN convolutions, as training with `tf32=true` leaves
    it; torch's previous flags come back after the test."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    yield
    matmul.fp32_precision, conv.fp32_precision = before


def _watch_flags(extractor) -> list[dict]:
    seen: list[dict] = []
    extractor.net.register_forward_hook(lambda module, inputs, output: seen.append(backend_flags()))
    return seen


# ------------------------------------------------------------------------------ feature precision


@pytest.mark.slow
def test_inception_features_run_in_ieee_fp32_even_with_tf32_on_globally_and_the_flags_come_back(
        random_inception, tf32_globally_on):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    extractor = I.InceptionFeatures(random_inception, device="cpu", batch_size=1, allow_download=False)
    seen = _watch_flags(extractor)
    extractor.extract(images)
    assert seen == [{"matmul": "ieee", "cudnn_conv": "ieee"}] * 2  # one per batch, inside the forward
    assert extractor.backend_flags == {"matmul": "ieee", "cudnn_conv": "ieee"}  # what the JSON records
    assert backend_flags() == {"matmul": "tf32", "cudnn_conv": "tf32"}  # restored

    # Restored also when the forward pass fails.
    extractor.net.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("broken forward")))
    with pytest.raises(RuntimeError, match="broken forward"):
        extractor.extract(images)
    assert backend_flags() == {"matmul": "tf32", "cudnn_conv": "tf32"}

    # feature_precision=tf32 turns TF32 on inside, whatever was set before, and says so in its identity.
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    tf32 = I.InceptionFeatures(random_inception, device="cpu", allow_download=False, precision="tf32")
    seen = _watch_flags(tf32)
    tf32.extract(images[:1])
    assert seen == [{"matmul": "tf32", "cudnn_conv": "tf32"}]
    assert backend_flags() == {"matmul": "ieee", "cudnn_conv": "ieee"}
    # fp32 keeps the identity of before (old results rows and caches); tf32 features never mix with them
    assert extractor.identity.count(":") == 1 and tf32.identity == extractor.identity + ":tf32"
    with pytest.raises(ValueError, match="unknown feature_precision 'bf16'"):
        I.InceptionFeatures(random_inception, device="cpu", allow_download=False, precision="bf16")


@pytest.mark.slow
def test_eval_fid_records_precision_flags_arithmetic_and_what_each_metric_used(tmp_path, random_inception, compose,
                                                                             tf32_globally_on):
    from dit.cli.eval_fid import evaluate_samples
    from dit.scoring.table import RESULTS_COLUMNS

    rng = np.random.default_rng(1)
    real, fake = (rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    # An ADM reference batch: its images, and mu/sigma over some other, larger set (N not recorded).
    ref = write_npz_atomic(tmp_path / "VIRTUAL_ref.npz", {"arr_0": real, "mu": np.zeros(2048),
                                                            "sigma": 0.01 * np.eye(2048)})
    samples = write_samples_npz(tmp_path / "samples.npz", fake)
    table = tmp_path / "results.csv"
    cfg = compose("eval", [f"samples={samples}", f"reference={ref}", f"feature_extractor_weights={random_inception}",
                           "allow_download=false", f"cache_dir={tmp_path / 'cache'}", f"results_table={table}",
                           "device=cpu", "metrics=[fid,prc]", "pr_arithmetic=adm", "prc_k=2"])
    record = evaluate_samples(cfg, cfg.samples)

    assert json.loads((tmp_path / "samples.inception.metrics.json").read_text()) == json.loads(
        json.dumps(record, default=str))
    assert record["scoring"] == {"feature_precision": "fp32",
                                 "backend_flags_during_extraction": {"matmul": "ieee", "cudnn_conv": "ieee"},
                                 "pr_arithmetic": "adm", "prc_k": 2}
    metrics = record["metrics"]
    assert metrics["num_reference"] == 5 and metrics["num_reference_pr"] == 5 and "num_reference_fid" not in metrics
    usage = record["reference_usage"]
    assert usage["fid_stats"] == "mu/sigma stored in the reference file (precomputed; N not recorded)"
    assert usage["num_reference_fid"] is None
    assert usage["used_for"]["precision_recall"] == "features of 5 reference images"
    with open(table, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert list(row) == list(RESULTS_COLUMNS)
    assert (row["feature_precision"], row["pr_arithmetic"], row["num_reference_pr"], row["num_reference_fid"]) == (
        "fp32", "adm", "5", "")
    assert float(row["precision"]) == pytest.approx(metrics["precision"], rel=1e-5)  # the metric, not a setting


def test_eval_config_refuses_unknown_feature_precision_and_pr_arithmetic(compose):
    cfg = to_eval_config(compose("eval", ["reference=r.npz"]))
    assert (cfg.feature_precision, cfg.pr_arithmetic) == ("fp32", "fp32")  # the defaults
    with pytest.raises(ConfigError, match="unknown feature_precision 'fp16'.*'fp32'.*'tf32'"):
        to_eval_config(compose("eval", ["reference=r.npz", "feature_precision=fp16"]))
    with pytest.raises(ConfigError, match="unknown pr_arithmetic 'tf'.*'adm'"):
        to_eval_config(compose("eval", ["reference=r.npz", "pr_arithmetic=tf"]))


# ------------------------------------------------------------------------------ ADM's precision/recall


def _numpy_adm_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's distance block written with numpy's float16 type: squares, row sums (float32
    accumulation), product (float32 accumulation), each rounded to float16, then
    (|u|^2 - 2 u.v) + |v|^2 in float16, clamped at 0; the block in float32 if anything overflowed."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        nu = np.sum(u16 * u16, axis=1, dtype=np.float32).astype(np.float16)
        nv = np.sum(v16 * v16, axis=1, dtype=np.float32).astype(np.float16)
        dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum((nu[:, None] - np.float16(2) * dot) + nv[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], 0)


def _numpy_adm_precision_recall(real, fake, k, block):
    def blocked(a, b):  # the full matrix from ADM's blocks
        return np.block([[_numpy_adm_distances(a[i:i + block], b[j:j + block]) for j in range(0, len(b), block)]
                         for i in range(0, len(a), block)])

    real_radii = np.partition(blocked(real, real), k, axis=1)[:, k]  # k-th neighbour, self at 0
    fake_radii = np.partition(blocked(fake, fake), k, axis=1)[:, k]
    cross = blocked(real, fake)
    precision = np.mean(np.any(cross <= real_radii[:, None], axis=0))
    recall = np.mean(np.any(cross <= fake_radii[None, :], axis=1))
    return float(precision), float(recall), real_radii, fake_radii


def _pool_like_features(rng, sizes, d=256, clusters=6):
    """Sets of non-negative features around shared cluster centres, of Inception pool magnitude
    (squared norms in the hundreds, where float16 steps are 0.25 to 0.5)."""
    centres = rng.gamma(2.0, 0.35, (clusters, d))
    return [np.maximum(centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)), 0).astype(np.float32)
            for n in sizes]


def test_adm_precision_recall_equals_an_independent_float16_computation_and_is_close_to_fp32():
    real, fake = _pool_like_features(np.random.default_rng(1), (300, 260))
    ours = PR.precision_recall(real, fake, k=3, arithmetic="adm", block_size=128)  # several blocks each way
    precision, recall, real_radii, fake_radii = _numpy_adm_precision_recall(real, fake, 3, 128)
    assert ours == (precision, recall)
    np.testing.assert_array_equal(PR.adm_radii(torch.from_numpy(real), 3, 128).numpy(), real_radii)
    np.testing.assert_array_equal(PR.adm_radii(torch.from_numpy(fake), 3, 128).numpy(), fake_radii)
    assert PR.precision_recall(real, fake, arithmetic="adm") == ours  # blocks do not matter without overflow
    # The radii really are float16 values, and the same metric as float32 to rounding
    assert (real_radii.astype(np.float16).astype(np.float32) == real_radii).all()
    exact = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), axis=1)[:, 3]
    # |u|^2 - 2 u.v + |v|^2 cancels: the error is a few float16 steps at the squared norms, not at the distance
    norm_step = float(np.spacing(np.float16((real.astype(np.float64) ** 2).sum(1).max())))
    assert np.abs(real_radii - exact).max() <= 3 * norm_step and (real_radii != exact).any()
    fp32 = M.precision_recall(real, fake, 3)  # the default arithmetic: torch-fidelity's
    assert 0.5 < fp32[0] < 0.95 and 0.5 < fp32[1] < 0.95  # not a degenerate case
    # a few boundary points of 300 flip (ADM's 2048-d features cancel less: about 1e-3 there)
    differences = (abs(ours[0] - fp32[0]), abs(ours[1] - fp32[1]))
    assert 0 < sum(differences) and max(differences) <= 0.015


def test_adm_distances_fall_back_to_float32_per_block_when_float16_overflows():
    real, fake = _pool_like_features(np.random.default_rng(13), (200, 150))
    real[:40] *= 30.0  # squared norms past 65 504: the first block of 64 rows overflows in float16
    d = PR.adm_squared_distances(torch.from_numpy(real[:64]), torch.from_numpy(fake[:64])).numpy()
    exact = np.maximum((real[:64, None].astype(np.float64) - fake[None, :64]) ** 2, 0).sum(-1)
    assert np.isfinite(d).all() and np.abs(d - exact).max() <= 1e-5 * exact.max()
    small = d[d < 60000]  # (the overflowing ones would not even fit a float16)
    assert (small.astype(np.float16).astype(np.float32) != small).any()  # float32 values, not float16 ones
    ours = PR.precision_recall(real, fake, k=3, arithmetic="adm", block_size=64)
    assert ours == _numpy_adm_precision_recall(real, fake, 3, 64)[:2]


def test_precision_recall_refuses_an_unknown_arithmetic_and_mismatched_features():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="unknown pr_arithmetic 'fp16'.*'fp32'.*'adm'"):
        PR.precision_recall(x, x, arithmetic="fp16")
    with pytest.raises(ValueError, match="feature dimensions differ: real 4, generated 5"):
        PR.precision_recall(x, np.zeros((10, 5)), arithmetic="adm")


# ------------------------------------------------------------------------------ reference use, results tables


class PixelFeatures:
    """Cheap deterministic stand-in features (2x2 average pooling of the pixels) under the
    Inception name, so ADM files' stored statistics are trusted as they would be."""

    name = "inception"
    identity = "pixels-as-inception"

    def extract(self, images, progress=False):
        x = torch.from_numpy(check_images(images)).float().permute(0, 3, 1, 2) / 255.0
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).double().numpy()}


def test_each_metric_reports_the_reference_data_it_used(tmp_path):
    rng = np.random.default_rng(14)
    real, fake = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (10, 9))
    ex = PixelFeatures()
    feats = M.sample_features(fake, ex)
    stored_mu, stored_sigma = np.full(12, 0.5), np.eye(12) * 0.01  # "the whole data set": not these 10 images
    adm = write_npz_atomic(tmp_path / "adm.npz", {"arr_0": real, "mu": stored_mu, "sigma": stored_sigma})
    ref = M.load_reference(adm, ex)
    out = M.metrics_from_features(feats, ref, ex.identity, M.MetricOptions(isc=False, sfid=False))
    assert out["num_reference"] == 10 and out["num_reference_pr"] == 10 and "num_reference_fid" not in out
    assert out["fid"] == pytest.approx(M.frechet_distance(*M.feature_statistics(feats["pool"]), stored_mu,
                                                          stored_sigma), rel=1e-12)
    usage = M.reference_usage(ref, out)
    assert usage["used_for"] == {"fid": "mu/sigma stored in the reference file (precomputed; N not recorded)",
                                 "precision_recall": "features of 10 reference images"}
    assert (usage["num_reference_images"], usage["num_reference_fid"], usage["num_reference_pr"]) == (10, None, 10)

    images_only = M.load_reference(write_samples_npz(tmp_path / "images.npz", real), ex)  # computed here
    out = M.metrics_from_features(feats, images_only, ex.identity, M.MetricOptions(isc=False, prc=False))
    assert out["num_reference_fid"] == 10 and "num_reference_pr" not in out
    assert M.reference_usage(images_only, out)["used_for"] == {"fid": "mu/sigma computed from 10 reference images"}

    M.save_stats(tmp_path / "stats.npz", images_only, include_features=False)  # our statistics file: N recorded
    saved = M.load_reference(tmp_path / "stats.npz", ex, need_features=False)
    out = M.metrics_from_features(feats, saved, ex.identity, M.MetricOptions(isc=False, prc=False))
    assert out["num_reference_fid"] == 10
    assert M.reference_usage(saved, out)["fid_stats"] == (
        "mu/sigma stored in the reference file (precomputed; from 10 images)")


def test_a_results_table_from_before_the_scoring_columns_keeps_its_rows(tmp_path):
    from dit.scoring.table import RESULTS_COLUMNS, SETTINGS_COLUMNS, append_results_row
    from dit.sampling.settings import SETTINGS_FIELDS

    # The header this code wrote before issue 12.
    old = ["time", "checkpoint", "step", "sampler", "num_steps", "cfg_scale", "guided_channels", "guidance_interval",
           "eta", "vae", "num_samples", "seed", "labels", "feature_extractor", "reference", "fid", "sfid",
           "inception_score", "precision", "recall", "kid", "class_accuracy", "samples"]
    table = tmp_path / "results.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old)
        w.writerow({"fid": "12.5", "precision": "0.61", "sampler": "ddpm"}.get(c, "") for c in old)
    append_results_row(table, {"fid": 3.25, "precision": 0.7, "num_reference_pr": 10000, "pr_arithmetic": "adm"})
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULTS_COLUMNS) and len(set(RESULTS_COLUMNS)) == len(RESULTS_COLUMNS)
    assert [(r["fid"], r["precision"], r["sampler"]) for r in rows] == [("12.5", "0.61", "ddpm"), ("3.25", "0.7", "")]
    assert [(r["num_reference_pr"], r["pr_arithmetic"]) for r in rows] == [("", ""), ("10000", "adm")]
    assert set(SETTINGS_COLUMNS) == set(SETTINGS_FIELDS) and set(SETTINGS_COLUMNS.values()) <= set(RESULTS_COLUMNS)
