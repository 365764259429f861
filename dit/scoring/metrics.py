"""Sample-quality metrics the way the papers computed them: FID, sFID, Inception Score and
precision/recall on a feature extractor's outputs against reference statistics (Dhariwal &
Nichol's `evaluator.py` protocol, ADM reference batches), plus KID.

The statistics and metrics are computed here, in float64, on the features of any extractor
with `extract(images) -> {"pool", ...}`: torch-fidelity's InceptionV3 (`dit.scoring.inception`, the
real protocol), the quickstart's toy judge (`dit.scoring.judge`), or a stand-in. `dit.scoring.extractors`
picks the extractor by name; which metrics are computed, and how, is one `MetricOptions`. Reference
statistics are cached on disk under a key that includes the extractor's identity (its weights
digest), the file identity and N.

Images everywhere are uint8 (N, H, W, 3) numpy arrays (contract 3 in docs/design.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dit.scoring.features import StreamedFeatures, stream_features
from dit.scoring.frechet import (PSD_TOLERANCE, SYMMETRY_TOLERANCE, _as_stats, _psd_factor,  # noqa: F401 - part of this API
                          feature_statistics, frechet_distance)
from dit.io.images import check_images, image_files
from dit.io.npz import npz_array_shape, open_npz, read_npz_array, write_npz_atomic
from dit.scoring.images import ArrayImages, ImageSource, open_images
from dit.scoring.precision_recall import check_pr_arithmetic, precision_recall  # noqa: F401 - part of this module's API

STATS_FORMAT_VERSION = 1


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    name: str  # family: "inception", "toy_judge", ...
    identity: str  # changes whenever the features could change (weights digest): part of cache keys

    def extract(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) -> {"pool": (N, D)} plus optionally "logits" (N, K), "spatial" (N, S)."""


# --------------------------------------------------------------------------------------
# Statistics of a set of images, reference batches and their cache
# --------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """What a set of images contributes to the metrics. `mu`/`sigma` (pool features) always;
    `mu_s`/`sigma_s` (spatial, sFID) and the per-image `pool` features (precision/recall, KID)
    and `logits` (IS) where known."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    extractor: str | None = None  # the extractor identity that made them (None: an ADM file)
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    logits: np.ndarray | None = None
    source: str | None = None
    image_size: tuple[int, int] | None = None  # (H, W) of the images, where known
    # Which images the statistics describe, which need not be the images in the file: ADM's
    # reference batches hold 10 000 images but mu/sigma over the whole data set, N unrecorded.
    stats_stored: bool = False  # mu/sigma used as stored in the reference file, not computed here
    stats_num_images: int | None = None  # images behind mu/sigma; None: the file does not say
    extra: dict = field(default_factory=dict)


def stats_from_features(feats: dict[str, np.ndarray], extractor_identity: str | None) -> FeatureStats:
    """FeatureStats from an extractor's output {"pool", optional "logits", "spatial"}."""
    mu, sigma = feature_statistics(feats["pool"])
    stats = FeatureStats(mu, sigma, num_images=len(feats["pool"]), extractor=extractor_identity,
                         pool=feats["pool"], logits=feats.get("logits"), stats_num_images=len(feats["pool"]))
    if feats.get("spatial") is not None:
        stats.mu_s, stats.sigma_s = feature_statistics(feats["spatial"])
    return stats


def compute_stats(images: np.ndarray | ImageSource, extractor: FeatureExtractor, progress: bool = False) -> FeatureStats:
    """Statistics of a set of images (an array, or an `ImageSource` read batch by batch): mu/sigma
    (and mu_s/sigma_s) accumulated on the fly, the per-image pool features kept (precision/recall,
    KID, the cache)."""
    source = images if isinstance(images, ImageSource) else ArrayImages(images)
    streamed = stream_features(source, extractor, moments=("pool", "spatial"), keep=("pool",), progress=progress)
    stats = stats_from_stream(streamed, extractor.identity)
    stats.image_size = source.image_size
    return stats


def stats_from_stream(streamed: StreamedFeatures, extractor_identity: str | None) -> FeatureStats:
    """FeatureStats from `stream_features`' moments ("pool", optional "spatial") and kept outputs."""
    (mu, sigma), spatial = streamed.moments["pool"], streamed.moments.get("spatial")
    stats = FeatureStats(mu, sigma, num_images=streamed.num_images, extractor=extractor_identity,
                         pool=streamed.kept.get("pool"), logits=streamed.kept.get("logits"),
                         stats_num_images=streamed.num_images)
    if spatial is not None:
        stats.mu_s, stats.sigma_s = spatial
    return stats


def save_stats(path: str | os.PathLike, stats: FeatureStats, include_features: bool = True) -> Path:
    """Our cached statistics: ADM's keys (`mu`, `sigma`, `mu_s`, `sigma_s`) plus the per-image
    `pool` features and a `meta` JSON string naming the extractor and N."""
    arrays = {"mu": stats.mu.astype(np.float64), "sigma": stats.sigma.astype(np.float64)}
    if stats.mu_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = stats.mu_s.astype(np.float64), stats.sigma_s.astype(np.float64)
    if include_features and stats.pool is not None:
        arrays["pool"] = stats.pool.astype(np.float32)
    meta = {"format_version": STATS_FORMAT_VERSION, "extractor": stats.extractor, "num_images": stats.num_images,
            "source": stats.source}
    if stats.image_size is not None:
        meta["image_size"] = [int(v) for v in stats.image_size]
    arrays["meta"] = np.array(json.dumps(meta))  # a unicode scalar: readable without pickle
    return write_npz_atomic(path, arrays)


def _source_identity(source: Path) -> dict:
    """Cheap identity of a file or folder: path, sizes and modification times."""
    if source.is_dir():
        files = image_files(source)
        listing = [(str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return {"path": str(source.resolve()), "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    st = source.stat()
    return {"path": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stats_npz(path: Path, extractor: FeatureExtractor) -> tuple[FeatureStats | None, bool]:
    """(statistics usable with this extractor or None, whether the file holds images `arr_0`)
    from an ADM or cached file. The images themselves are not read here (10 000 reference
    images at 256x256 are 2 GB): `load_reference` reads them only when it needs them."""
    with open_npz(path) as data:
        keys = set(data.files)
        meta = json.loads(str(read_npz_array(data, "meta", path))) if "meta" in keys else None
        has_images = "arr_0" in keys
        stats = None
        if {"mu", "sigma"} <= keys:
            # ADM reference batches carry no metadata: their mu/sigma are Inception pool_3 statistics.
            made_by = meta.get("extractor") if meta else None
            usable = made_by == extractor.identity if made_by else extractor.name == "inception"
            if usable:
                if meta:
                    num_images = meta.get("num_images")
                else:
                    num_images = npz_array_shape(path, "arr_0")[0] if has_images else None
                size = (meta or {}).get("image_size") or (npz_array_shape(path, "arr_0")[1:3] if has_images else None)
                stats = FeatureStats(np.asarray(read_npz_array(data, "mu", path), np.float64),
                                     np.asarray(read_npz_array(data, "sigma", path), np.float64),
                                     num_images=num_images, extractor=made_by, source=str(path),
                                     image_size=tuple(int(v) for v in size) if size else None, stats_stored=True,
                                     stats_num_images=meta.get("num_images") if meta else None)
                if {"mu_s", "sigma_s"} <= keys:
                    stats.mu_s = np.asarray(read_npz_array(data, "mu_s", path), np.float64)
                    stats.sigma_s = np.asarray(read_npz_array(data, "sigma_s", path), np.float64)
                if "pool" in keys and made_by == extractor.identity:
                    stats.pool = read_npz_array(data, "pool", path)
    return stats, has_images


def load_reference(source: str | os.PathLike, extractor: FeatureExtractor, *, cache_dir: str | os.PathLike | None = None,
                   need_features: bool = True, progress: bool = False) -> FeatureStats:
    """Reference statistics from an ADM reference batch (`mu`/`sigma` used as stored, images for
    precision/recall), a folder of images, or a statistics file we cached. Computed features are
    cached in `cache_dir` under a key made of the source's identity (path, size, modification
    time) and the extractor's identity (weights digest), so a different weights file, a changed
    file or folder, or a different N never reuses stale statistics."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"reference {source} does not exist: pass an ADM reference batch .npz, a folder of "
                                "images, or a statistics .npz written by dit.scoring.metrics.save_stats")
    stored, has_images = (None, True) if source.is_dir() else _read_stats_npz(source, extractor)
    if stored is not None and (stored.pool is not None or not need_features or not has_images):
        return stored
    if not has_images:
        raise ValueError(f"reference {source} has no images (arr_0) and no mu/sigma usable with the "
                         f"{extractor.identity} extractor: give a reference made with this extractor, or images")

    cache_path = None
    if cache_dir is not None:
        fields = {"source": _source_identity(source), "extractor": extractor.identity, "version": STATS_FORMAT_VERSION}
        if getattr(extractor, "precision", None) is not None:  # features computed before it was forced are not reused
            fields["feature_precision"] = extractor.precision
        key = json.dumps(fields, sort_keys=True)
        cache_path = Path(cache_dir).expanduser() / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        if cache_path.is_file():
            cached, _ = _read_stats_npz(cache_path, extractor)
            if cached is not None and cached.pool is not None:
                cached.source = str(source)  # what the user named, not our cache file
                return _prefer_stored(stored, cached)

    with open_images(source)[0] as images:  # read batch by batch, never whole
        computed = compute_stats(images, extractor, progress=progress)
    computed.source = str(source)
    if cache_path is not None:
        save_stats(cache_path, computed)
    return _prefer_stored(stored, computed)


def _prefer_stored(stored: FeatureStats | None, computed: FeatureStats) -> FeatureStats:
    """ADM's evaluator uses a reference file's own mu/sigma when it has them (and its images only
    for precision/recall): keep that behaviour so our FID matches theirs on their files."""
    if stored is None:
        return computed
    stored.pool = computed.pool
    stored.logits = computed.logits
    stored.image_size = stored.image_size or computed.image_size
    if stored.mu_s is None and computed.mu_s is not None:
        stored.mu_s, stored.sigma_s = computed.mu_s, computed.sigma_s
        stored.extra["spatial_num_images"] = computed.num_images  # sFID's statistics are from the images
    return stored


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricOptions:
    """Which metrics to compute and how: FID, sFID, Inception Score, precision/recall (`prc`)
    and KID switched on or off; precision/recall's k (ADM: 3) and arithmetic ("fp32" or "adm",
    dit.scoring.precision_recall); IS over splits of `isc_split_size` images (ADM: 5000); KID
    over `kid_subsets` random subsets of `kid_subset_size` images."""

    fid: bool = True
    sfid: bool = True
    isc: bool = True
    prc: bool = True
    kid: bool = False
    prc_k: int = 3
    pr_arithmetic: str = "fp32"
    isc_split_size: int = 5000
    kid_subsets: int = 100
    kid_subset_size: int = 1000


def check_reference(reference: FeatureStats, image_size: tuple[int, int] | None = None) -> None:
    """ValueError naming the reference if the samples' (H, W) differ from its images' (where both
    are known: FID between resolutions measures the resize, not the model) or if its statistics
    are not a mean and a symmetric positive semi-definite covariance."""
    where = reference.source or "the reference"
    if image_size is not None and reference.image_size is not None and tuple(image_size) != tuple(reference.image_size):
        (h, w), (rh, rw) = image_size, reference.image_size
        raise ValueError(f"samples are {h}x{w} but the images of reference {where} are {rh}x{rw}: FID compares "
                         "sets at one resolution; sample at the reference's resolution, or use a reference made "
                         "at the samples' resolution")
    if reference.extra.get("covariances_checked"):
        return
    for mu, sigma, what in ((reference.mu, reference.sigma, ""), (reference.mu_s, reference.sigma_s, " (spatial)")):
        if mu is None or sigma is None:
            continue
        which = f"reference {where}{what}"
        try:
            _psd_factor(_as_stats(mu, sigma, which)[1], which)
        except ValueError as err:
            raise ValueError(f"{err}; recompute its statistics from its images, or use an intact copy of the "
                             "reference file") from None
    reference.extra["covariances_checked"] = True  # once per loaded reference (the in-training evaluator reuses it)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of `split_size` images,
    unshuffled (ADM's evaluator: 50 000 samples -> 10 splits). Computed by torch-fidelity."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    splits = max(1, round(len(logits) / split_size))
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_inception_distance(real_features, fake_features, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (polynomial-kernel MMD^2) mean and std over random subsets. Computed by torch-fidelity."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    fake = torch.as_tensor(np.asarray(fake_features, dtype=np.float32))
    real = torch.as_tensor(np.asarray(real_features, dtype=np.float32))
    size = min(subset_size, len(fake), len(real))
    out = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def sample_features(images: np.ndarray, extractor: FeatureExtractor, labels: np.ndarray | None = None,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """The extractor's per-image outputs for generated images, plus "correct" (whether the
    extractor's classifier agrees with the conditioning label) when both exist. Per-image, so
    ranks can compute their share and gather."""
    images = check_images(images, "samples")
    feats = dict(extractor.extract(images, progress=progress))
    classify = getattr(extractor, "classify", None)
    if labels is not None and classify is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per sample: {len(images)} samples, labels shaped {labels.shape}")
        feats["correct"] = classify(images) == labels
    return feats


def metrics_from_features(feats: dict[str, np.ndarray], reference: FeatureStats, extractor_identity: str | None,
                          options: MetricOptions = MetricOptions(), *,
                          image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """The metrics `options` ask for, of generated images (given by `sample_features`) against
    reference statistics. Metrics that the reference or the extractor cannot support (sFID
    without spatial statistics, precision/recall without reference features, class accuracy
    without labels or a classifier) are left out, not faked. `image_size` (H, W) of the samples
    is checked against the reference's, where known; a reference whose covariances are not
    symmetric PSD is refused. Besides the metrics: `num_samples`, `num_reference` (images in the
    reference file), `num_reference_fid` (images behind the FID statistics, where known: not for
    ADM batches) and `num_reference_pr` (reference images whose features gave precision/recall
    and KID); `reference_usage` says the same in words."""
    return metrics_from_stats(stats_from_features(feats, extractor_identity), reference, extractor_identity, options,
                              correct=feats.get("correct"), image_size=image_size)


def metrics_from_stats(sample: FeatureStats, reference: FeatureStats, extractor_identity: str | None,
                       options: MetricOptions = MetricOptions(), *, correct: np.ndarray | None = None,
                       image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """`metrics_from_features` on the samples' statistics (mu/sigma, and mu_s/sigma_s, `pool`,
    `logits` where the asked metrics need them) and `correct` (N,) bool for class accuracy."""
    o = options
    check_pr_arithmetic(o.pr_arithmetic)
    if reference.extractor is not None and extractor_identity is not None and reference.extractor != extractor_identity:
        raise ValueError(f"reference statistics were made by {reference.extractor}, the samples are scored by "
                         f"{extractor_identity}: recompute the reference with the same extractor")
    check_reference(reference, image_size)
    out: dict[str, float] = {"num_samples": int(sample.num_images)}
    if reference.num_images is not None:
        out["num_reference"] = int(reference.num_images)  # images in the reference (the key before the two below)
    if (o.fid or o.sfid) and reference.stats_num_images is not None:
        out["num_reference_fid"] = int(reference.stats_num_images)
    if (o.prc or o.kid) and reference.pool is not None:
        out["num_reference_pr"] = int(len(reference.pool))
    if o.fid:
        out["fid"] = frechet_distance(sample.mu, sample.sigma, reference.mu, reference.sigma)
    if o.sfid and sample.mu_s is not None and reference.mu_s is not None:
        out["sfid"] = frechet_distance(sample.mu_s, sample.sigma_s, reference.mu_s, reference.sigma_s)
    if o.isc and sample.logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(sample.logits, o.isc_split_size)
    if (o.prc or o.kid) and reference.pool is None:
        warnings.warn(f"precision/recall and KID need reference images; {reference.source} has statistics only")
    if o.prc and reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(reference.pool, sample.pool, o.prc_k, o.pr_arithmetic)
    if o.kid and reference.pool is not None:
        out["kid"], out["kid_std"] = kernel_inception_distance(reference.pool, sample.pool, o.kid_subsets,
                                                               o.kid_subset_size)
    if correct is not None:
        out["class_accuracy"] = float(np.mean(correct))
    return out


def reference_usage(reference: FeatureStats, metrics: dict) -> dict:
    """Which reference data each metric in `metrics` (a `metrics_from_features` result) used, for
    the results JSON: ADM reference batches give FID their stored mu/sigma (over the whole data
    set, N not recorded) and precision/recall their 10 000 images."""
    n_stats = reference.stats_num_images
    if reference.stats_stored:
        fid_stats = "mu/sigma stored in the reference file (precomputed; " + (
            f"from {n_stats} images)" if n_stats is not None else "N not recorded)")
    else:
        fid_stats = f"mu/sigma computed from {n_stats} reference images"
    used_for = {}
    if "fid" in metrics:
        used_for["fid"] = fid_stats
    if "sfid" in metrics:
        n_spatial = reference.extra.get("spatial_num_images")
        used_for["sfid"] = (f"mu_s/sigma_s computed from {n_spatial} reference images" if n_spatial is not None
                            else fid_stats.replace("mu/sigma", "mu_s/sigma_s"))
    for key, name in (("precision", "precision_recall"), ("kid", "kid")):
        if key in metrics:
            used_for[name] = f"features of {metrics['num_reference_pr']} reference images"
    return {"source": reference.source, "fid_stats": fid_stats, "num_reference_images": metrics.get("num_reference"),
            "num_reference_fid": n_stats, "num_reference_pr": metrics.get("num_reference_pr"), "used_for": used_for}


def compute_metrics(images: np.ndarray | ImageSource, reference: FeatureStats, extractor: FeatureExtractor,
                    options: MetricOptions = MetricOptions(), *, labels: np.ndarray | None = None,
                    progress: bool = False) -> dict[str, float]:
    """Score generated uint8 images (an array, or an `ImageSource` such as `dit.scoring.images.NpzImages`,
    read batch by batch) against reference statistics, as in `metrics_from_features`. Memory:
    O(D^2) for FID and sFID (their statistics are accumulated on the fly); per-image pool
    features only when precision/recall or KID are asked (and the reference has features),
    logits only for IS."""
    source = images if isinstance(images, ImageSource) else ArrayImages(images, "samples")
    check_reference(reference, source.image_size)  # before the (slow) feature extraction
    with_pool = (options.prc or options.kid) and reference.pool is not None
    keep = ("pool",) * with_pool + ("logits",) * bool(options.isc)
    moments = ("pool",) + ("spatial",) * bool(options.sfid)  # pool always, as before (N >= 2)
    streamed = stream_features(source, extractor, moments=moments, keep=keep, labels=labels, progress=progress)
    return metrics_from_stats(stats_from_stream(streamed, extractor.identity), reference, extractor.identity, options,
                              correct=streamed.correct, image_size=source.image_size)
