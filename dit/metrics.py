"""Sample-quality metrics the way the papers computed them: FID, sFID, Inception Score and
precision/recall on Inception features against an ADM reference batch (Dhariwal & Nichol's
`evaluator.py` protocol), plus KID.

Features come from torch-fidelity's TF-compatible InceptionV3 (the 2015 graph the FID
literature uses, with TF1's bilinear resize); the statistics and metrics are computed here, on
those features, for three reasons (all pitfalls documented in torch-fidelity's source):

- its FID asserts that `mu` and `sigma` share a dtype, yet it builds `mu` as float32 and `sigma`
  as float64, and ADM reference files store both as float64: we keep everything float64;
- its on-disk cache key is the input's name and the extractor's name, not the weights file nor
  the number of images: our cache key includes the weights digest, the file identity and N;
- its high-level API defaults to `cuda=True`: we pass the device explicitly.

The feature extractor is pluggable: `"inception"` (the real protocol) or `"toy_judge"` (the
quickstart's classifier, `dit.judge`), or any object with `extract(images) -> {"pool", ...}`.

Images everywhere are uint8 (N, H, W, 3) numpy arrays (contract 3 in DESIGN.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.checkpoint import save_atomic
# torch-fidelity's InceptionV3 weights, converted from the TF 2015-12-05 graph that FID uses.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# ADM's sFID: the first 7 channels of the `mixed_6/conv` activation (17x17), flattened channel-last
# (TF is NHWC). torch-fidelity's weight converter maps TF `mixed_6/conv` to `Mixed_6d.branch1x1`.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
STATS_FORMAT_VERSION = 1


class FeatureExtractorUnavailable(RuntimeError):
    """The feature extractor's weights are neither on disk nor downloadable."""


# --------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, both float64 (FID's `mu`, `sigma`)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(features)}")
    features = features.astype(np.float64, copy=False)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _as_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: mu/sigma contain NaN or inf (were the images or features broken?)")
    if (np.diag(sigma) < 0).any():
        raise ValueError(f"{which}: sigma has negative variances on its diagonal: not a covariance matrix")
    return mu, (sigma + sigma.T) / 2  # symmetric by definition; np.cov rounding may break that


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A (D, r) with A A^T = sigma, r its numerical rank: LAPACK's pivoted Cholesky (pstrf), which
    stops where the remaining diagonal falls to rounding level. For the singular covariances of
    small sets (N images < D dimensions) r <= N - 1, which makes the rest cheap."""
    from scipy.linalg.lapack import dpstrf

    c, piv, rank, info = dpstrf(sigma, tol=-1.0, lower=1)  # tol < 0: LAPACK's D * eps * max(diag)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    factor = np.zeros((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: sigma = factor @ factor.T
    return factor


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    The reference implementations take `scipy.linalg.sqrtm` of the non-symmetric product S1 S2,
    which returns complex parts and NaNs when the covariances are singular (fewer images than
    dimensions) and needs an epsilon retry. We use that S1 S2 = A A^T S2 has the nonzero
    eigenvalues of A^T S2 A for any factor A A^T = S1 (here a rank-revealing pivoted Cholesky):
    that matrix is symmetric PSD, so a symmetric eigensolver gives its eigenvalues stably and
    tr((S1 S2)^(1/2)) is the sum of their square roots (tiny negative ones from rounding are
    clipped to 0). Equal to the sqrtm form wherever that one is well defined, and only r x r
    (r = the smaller rank) for small sets.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first set")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second set")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (different extractors?)")
    factor1, factor2 = _psd_factor(sigma1), _psd_factor(sigma2)
    # tr((S1 S2)^(1/2)) is symmetric in the two sets: project with the lower-rank factor.
    middle = factor1.T @ sigma2 @ factor1 if factor1.shape[1] <= factor2.shape[1] else factor2.T @ sigma1 @ factor2
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    trace_sum = np.trace(sigma1) + np.trace(sigma2)
    value = float(diff @ diff + trace_sum - 2.0 * tr_covmean)
    if value < 0.0:
        # Identical statistics give a rounding-level negative number; anything larger is a bug.
        if value < -1e-6 * max(1.0, trace_sum):
            raise FloatingPointError(f"Fréchet distance came out negative ({value}): the covariances are not PSD")
        value = 0.0
    return value


# --------------------------------------------------------------------------------------
# Sample files (ADM .npz) and image folders
# --------------------------------------------------------------------------------------


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """Validate uint8 (N, H, W, 3) images (numpy or torch); return them as a numpy array."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"{what} must be uint8 (N, H, W, 3) in 0..255, got dtype {arr.dtype}: convert samples in [-1, 1] "
            "with dit.sampling.to_uint8"
        )
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be shaped (N, H, W, 3) (channels last), got {arr.shape}")
    return arr


@dataclass
class StreamedArray:
    """An array written to an `.npz` chunk by chunk (C order along the first axis), so files
    larger than memory can be assembled: 50 000 samples at 512x512 are 39 GB."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Iterable[np.ndarray]


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray | StreamedArray]) -> Path:
    """Write an `.npz` that `np.load` reads, byte-for-byte reproducibly (fixed zip timestamps,
    unlike `np.savez`, which stamps the current time) and atomically (temp file + os.replace).
    Values are arrays or `StreamedArray`s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                if not isinstance(value, StreamedArray):
                    value = np.asarray(value)
                    if value.dtype == object:
                        raise TypeError(f"{key}: object arrays would need pickle; store plain arrays")
                    value = StreamedArray(value.shape, value.dtype, [value])
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)), "fortran_order": False,
                              "shape": tuple(int(d) for d in value.shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    rows = 0
                    for chunk in value.chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=value.dtype)
                        if chunk.shape[1:] != tuple(value.shape[1:]):
                            raise ValueError(f"{key}: chunk shaped {chunk.shape} does not fit {value.shape}")
                        f.write(chunk.tobytes())
                        rows += len(chunk) if chunk.ndim else 1
                    if rows != (value.shape[0] if len(value.shape) else 1):
                        raise ValueError(f"{key}: wrote {rows} rows, expected {value.shape[0] if value.shape else 1}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_samples_npz(path: str | os.PathLike, images: Any, labels: Any | None = None) -> Path:
    """The ADM evaluator format: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels (N,) when known."""
    images = check_images(images, "samples")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"need one label per image: {len(images)} images, labels shaped {labels.shape}")
        arrays["arr_1"] = labels
    return write_npz_atomic(path, arrays)


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)  # never unpickle objects from a foreign file
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} as an .npz file ({err}): is it truncated or not an .npz?") from err


def _read_key(data, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as err:  # e.g. a pickled object array, refused because allow_pickle=False
        raise ValueError(f"{path}: cannot read {key!r} without unpickling ({err}); only plain arrays are accepted") from err


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels (N,) or None) from an ADM-format `.npz`."""
    path = Path(path)
    with _open_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no images (key 'arr_0'; keys: {data.files}): not an ADM sample batch")
        images = check_images(_read_key(data, "arr_0", path), f"{path}: arr_0")
        labels = _read_key(data, "arr_1", path) if "arr_1" in data.files else None
    if labels is not None and labels.shape != (len(images),):
        labels = None  # not per-image labels
    return images, labels


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """All images under `folder` (recursively, sorted by path) as uint8 (N, H, W, 3). They must share
    one size: FID compares images at the resolution they were generated or prepared at."""
    from PIL import Image

    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = []
    for f in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 1000):
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as err:
            raise ValueError(f"cannot read image {f}: {err}") from err
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{f} is {images[-1].shape[:2]} but {files[0]} is {images[0].shape[:2]}: "
                             "resize/crop the folder to one size first")
    return np.stack(images)


def read_images(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels where stored) from an ADM `.npz` or a folder of image files."""
    source = Path(source).expanduser()
    if source.is_dir():
        return read_image_folder(source), None
    if source.is_file():
        return read_samples_npz(source)
    raise FileNotFoundError(f"{source} is neither an .npz file nor a folder of images")


# --------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    name: str  # family: "inception", "toy_judge", ...
    identity: str  # changes whenever the features could change (weights digest): part of cache keys

    def extract(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) -> {"pool": (N, D)} plus optionally "logits" (N, K), "spatial" (N, S)."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host accepts a TCP connection: fail at once on an offline machine instead of
    after urllib's long timeouts."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_weights_message(reason: str) -> str:
    return (
        f"{reason}. FID/IS/precision/recall need torch-fidelity's InceptionV3 weights file {INCEPTION_WEIGHTS_FILE} "
        f"({INCEPTION_WEIGHTS_URL}). Download it on a machine with network access and pass its path as "
        f"feature_extractor_weights=/path/to/{INCEPTION_WEIGHTS_FILE}, or copy it to "
        f"{Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_WEIGHTS_FILE}."
    )


def resolve_inception_weights(path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """The Inception weights file: `path` if given, else torch hub's cache, else a download
    (when allowed and the network answers). Otherwise a `FeatureExtractorUnavailable` that names
    the file to provide."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FeatureExtractorUnavailable(_missing_weights_message(f"feature_extractor_weights={path} does not exist"))
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if not allow_download:
        raise FeatureExtractorUnavailable(_missing_weights_message(f"{cached} is missing and downloads are off"))
    if not _reachable(INCEPTION_WEIGHTS_URL):
        raise FeatureExtractorUnavailable(_missing_weights_message(f"{cached} is missing and the network is unreachable"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.part{os.getpid()}")
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(tmp), progress=True)
        os.replace(tmp, cached)
    except Exception as err:  # noqa: BLE001 - urllib/http raise many types
        raise FeatureExtractorUnavailable(_missing_weights_message(f"downloading failed ({err})")) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return cached


def _check_plain_state_dict(path: Path) -> None:
    """torch-fidelity loads the weights with `weights_only=False` (full unpickling). A file that
    loads under `weights_only=True` contains only tensors and containers, so unpickling it fully
    cannot run code; anything else is refused here, before torch-fidelity sees it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"refusing {path}: not a plain tensor state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not an InceptionV3 state dict (expected a dict of tensors)")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class InceptionFeatures:
    """torch-fidelity's TF-compatible InceptionV3: pool_3 (2048) features for FID, precision/recall
    and KID; the 1008 unbiased logits for the Inception Score (as ADM: no bias); ADM's spatial
    features for sFID.

    Args:
        weights: path of the weights file (offline use); None: torch hub's cache or a download.
        device: "auto" (CUDA when available), "cpu", "cuda:1", ...
        batch_size: images per forward pass.
        allow_download: whether a missing file may be downloaded.
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
                 batch_size: int = 64, allow_download: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights, allow_download)
        _check_plain_state_dict(path)
        self.weights_path = path
        self.identity = f"inception-v3-compat:{_file_sha256(path)[:16]}"
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        ).to(self.device)
        self._spatial: list[torch.Tensor] = []
        self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # (B, 192, 17, 17) -> first 7 channels, channel-last, flattened: (B, 17 * 17 * 7)
        s = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial.append(s.reshape(s.shape[0], -1).float().cpu())

    @torch.no_grad()
    def extract(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        images = check_images(images)
        pools, logits, spatial = [], [], []
        for i in tqdm(range(0, len(images), self.batch_size), desc="inception features", disable=not progress, leave=False):
            batch = torch.from_numpy(images[i : i + self.batch_size]).permute(0, 3, 1, 2).to(self.device)  # (B, 3, H, W) uint8
            self._spatial.clear()
            pool, logit = self.net(batch)
            pools.append(pool.cpu())
            logits.append(logit.cpu())
            spatial.append(self._spatial[-1])
        self._spatial.clear()
        if not pools:
            raise ValueError("no images to extract features from")
        return {
            "pool": torch.cat(pools).numpy(),  # (N, 2048) float32
            "logits": torch.cat(logits).numpy(),  # (N, 1008)
            "spatial": torch.cat(spatial).numpy(),  # (N, 2023)
        }


class JudgeFeatures:
    """Adapter for the quickstart's toy judge (`dit.judge.ToyJudge`): its pooled features stand in
    for Inception's, its logits give an Inception-Score analogue, and `classify` gives the class
    accuracy of conditional samples."""

    name = "toy_judge"

    def __init__(self, judge):
        self.judge = judge
        self.identity = f"toy_judge:{judge.settings.cache_name()}"

    def extract(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        images = check_images(images)
        return {"pool": self.judge.features(images), "logits": self.judge.logits(images).numpy()}

    def classify(self, images: np.ndarray) -> np.ndarray:
        return self.judge.classify(check_images(images))


def build_feature_extractor(name: str = "inception", *, weights: str | None = None, device: str | None = "auto",
                            batch_size: int = 64, allow_download: bool = True, image_size: int | None = None,
                            judge_cache_dir: str | None = None, judge_seed: int = 0) -> FeatureExtractor:
    """`"inception"` (FID protocol) or `"toy_judge"` (quickstart; needs `image_size`, trained once and
    cached in `judge_cache_dir`)."""
    if name == "inception":
        return InceptionFeatures(weights, device=device, batch_size=batch_size, allow_download=allow_download)
    if name == "toy_judge":
        from dit.judge import ToyJudge  # lazy: only the quickstart needs it

        if image_size is None:
            raise ValueError("feature_extractor=toy_judge needs the image size of the samples")
        return JudgeFeatures(ToyJudge.load_or_train(judge_cache_dir, image_size=image_size, seed=judge_seed))
    raise ValueError(f"unknown feature_extractor {name!r}: use 'inception' or 'toy_judge'")


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised InceptionV3 state dict in torch-fidelity's layout, for offline tests and
    timing only (its features mean nothing). Kaiming-normal convolutions keep activations O(1)
    through the 90-odd layers, so the statistics are well scaled."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder = path.with_name(f".{path.name}.empty")
    torch.save({}, placeholder)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _RandomInception("random-inception", ["2048"], feature_extractor_weights_path=str(placeholder))
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)
    finally:
        placeholder.unlink()
    return save_atomic(net.state_dict(), path)


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
    extra: dict = field(default_factory=dict)


def stats_from_features(feats: dict[str, np.ndarray], extractor_identity: str | None) -> FeatureStats:
    """FeatureStats from an extractor's output {"pool", optional "logits", "spatial"}."""
    mu, sigma = feature_statistics(feats["pool"])
    stats = FeatureStats(mu, sigma, num_images=len(feats["pool"]), extractor=extractor_identity,
                         pool=feats["pool"], logits=feats.get("logits"))
    if feats.get("spatial") is not None:
        stats.mu_s, stats.sigma_s = feature_statistics(feats["spatial"])
    return stats


def compute_stats(images: np.ndarray, extractor: FeatureExtractor, progress: bool = False) -> FeatureStats:
    return stats_from_features(extractor.extract(check_images(images), progress=progress), extractor.identity)


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
    arrays["meta"] = np.array(json.dumps(meta))  # a unicode scalar: readable without pickle
    return write_npz_atomic(path, arrays)


def _source_identity(source: Path) -> dict:
    """Cheap identity of a file or folder: path, sizes and modification times."""
    if source.is_dir():
        files = _image_files(source)
        listing = [(str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return {"path": str(source.resolve()), "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    st = source.stat()
    return {"path": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an `.npz` from its header, without reading the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return tuple(shape)


def _read_stats_npz(path: Path, extractor: FeatureExtractor) -> tuple[FeatureStats | None, bool]:
    """(statistics usable with this extractor or None, whether the file holds images `arr_0`)
    from an ADM or cached file. The images themselves are not read here (10 000 reference
    images at 256x256 are 2 GB): `load_reference` reads them only when it needs them."""
    with _open_npz(path) as data:
        keys = set(data.files)
        meta = json.loads(str(_read_key(data, "meta", path))) if "meta" in keys else None
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
                    num_images = _npz_array_shape(path, "arr_0")[0] if has_images else None
                stats = FeatureStats(np.asarray(_read_key(data, "mu", path), np.float64),
                                     np.asarray(_read_key(data, "sigma", path), np.float64),
                                     num_images=num_images, extractor=made_by, source=str(path))
                if {"mu_s", "sigma_s"} <= keys:
                    stats.mu_s = np.asarray(_read_key(data, "mu_s", path), np.float64)
                    stats.sigma_s = np.asarray(_read_key(data, "sigma_s", path), np.float64)
                if "pool" in keys and made_by == extractor.identity:
                    stats.pool = _read_key(data, "pool", path)
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
                                "images, or a statistics .npz written by dit.metrics.save_stats")
    stored, has_images = (None, True) if source.is_dir() else _read_stats_npz(source, extractor)
    if stored is not None and (stored.pool is not None or not need_features or not has_images):
        return stored
    if not has_images:
        raise ValueError(f"reference {source} has no images (arr_0) and no mu/sigma usable with the "
                         f"{extractor.identity} extractor: give a reference made with this extractor, or images")

    cache_path = None
    if cache_dir is not None:
        key = json.dumps({"source": _source_identity(source), "extractor": extractor.identity,
                          "version": STATS_FORMAT_VERSION}, sort_keys=True)
        cache_path = Path(cache_dir).expanduser() / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        if cache_path.is_file():
            cached, _ = _read_stats_npz(cache_path, extractor)
            if cached is not None and cached.pool is not None:
                return _prefer_stored(stored, cached)

    images = read_image_folder(source) if source.is_dir() else read_samples_npz(source)[0]
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
    if stored.mu_s is None:
        stored.mu_s, stored.sigma_s = computed.mu_s, computed.sigma_s
    return stored


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of `split_size` images,
    unshuffled (ADM's evaluator: 50 000 samples -> 10 splits). Computed by torch-fidelity."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    splits = max(1, round(len(logits) / split_size))
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) on the given features (ADM: Inception
    pool_3, k = 3): precision = share of generated samples inside the real manifold (union of balls
    reaching each real sample's k-th neighbour), recall = the converse. Computed by torch-fidelity."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    fake = torch.as_tensor(np.asarray(fake_features, dtype=np.float32))
    real = torch.as_tensor(np.asarray(real_features, dtype=np.float32))
    for name, f in (("real", real), ("generated", fake)):
        if len(f) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {len(f)}")
    return calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=10000)


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


def metrics_from_features(feats: dict[str, np.ndarray], reference: FeatureStats, extractor_identity: str | None, *,
                          fid: bool = True, sfid: bool = True, isc: bool = True, prc: bool = True, kid: bool = False,
                          prc_k: int = 3, isc_split_size: int = 5000, kid_subsets: int = 100,
                          kid_subset_size: int = 1000) -> dict[str, float]:
    """Metrics of generated images (given by `sample_features`) against reference statistics.
    Metrics that the reference or the extractor cannot support (sFID without spatial statistics,
    precision/recall without reference features, class accuracy without labels or a classifier)
    are left out, not faked."""
    if reference.extractor is not None and extractor_identity is not None and reference.extractor != extractor_identity:
        raise ValueError(f"reference statistics were made by {reference.extractor}, the samples are scored by "
                         f"{extractor_identity}: recompute the reference with the same extractor")
    sample = stats_from_features(feats, extractor_identity)
    out: dict[str, float] = {"num_samples": int(sample.num_images)}
    if reference.num_images is not None:
        out["num_reference"] = int(reference.num_images)
    if fid:
        out["fid"] = frechet_distance(sample.mu, sample.sigma, reference.mu, reference.sigma)
    if sfid and sample.mu_s is not None and reference.mu_s is not None:
        out["sfid"] = frechet_distance(sample.mu_s, sample.sigma_s, reference.mu_s, reference.sigma_s)
    if isc and sample.logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(sample.logits, isc_split_size)
    if (prc or kid) and reference.pool is None:
        warnings.warn(f"precision/recall and KID need reference images; {reference.source} has statistics only")
    if prc and reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(reference.pool, sample.pool, prc_k)
    if kid and reference.pool is not None:
        out["kid"], out["kid_std"] = kernel_inception_distance(reference.pool, sample.pool, kid_subsets, kid_subset_size)
    if "correct" in feats:
        out["class_accuracy"] = float(np.mean(feats["correct"]))
    return out


def compute_metrics(images: np.ndarray, reference: FeatureStats, extractor: FeatureExtractor, *,
                    labels: np.ndarray | None = None, progress: bool = False, **options) -> dict[str, float]:
    """Score generated uint8 images against reference statistics; `options` as in
    `metrics_from_features` (fid, sfid, isc, prc, kid, prc_k, ...)."""
    feats = sample_features(images, extractor, labels, progress=progress)
    return metrics_from_features(feats, reference, extractor.identity, **options)


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------

RESULTS_COLUMNS = (
    "time", "checkpoint", "step", "sampler", "num_steps", "cfg_scale", "guided_channels", "guidance_interval",
    "vae", "num_samples", "seed", "labels", "feature_extractor", "reference", "fid", "sfid", "inception_score",
    "precision", "recall", "kid", "class_accuracy", "samples",
)


def append_results_row(path: str | os.PathLike, row: dict) -> Path:
    """Append one evaluation to a CSV table (header written once; columns `RESULTS_COLUMNS`, so
    `sort -t, -k15 -g` or pandas can rank runs). Unknown keys are ignored, missing ones left empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != RESULTS_COLUMNS:
            raise ValueError(f"results table {path} has columns {header}, not {list(RESULTS_COLUMNS)}: "
                             "move it aside or pass another results_table path")
        write_header = False
    else:
        write_header = True
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, extrasaction="ignore")
    if write_header:
        writer.writeheader()
    writer.writerow({k: _cell(row.get(k)) for k in RESULTS_COLUMNS})
    with open(path, "a", newline="") as f:  # one write: concurrent appends do not interleave lines
        f.write(buf.getvalue())
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------
# In-training evaluation
# --------------------------------------------------------------------------------------


class FIDEvaluator:
    """Periodic evaluation during training: sample `num_samples` images with the (EMA) model and
    score them against a reference whose statistics are computed once (on the first call, and
    cached on disk in `cache_dir`). Sample i depends only on (seed, i), so the same step gives
    the same numbers whatever the number of ranks.

        evaluator = FIDEvaluator("VIRTUAL_imagenet256_labeled.npz", num_samples=5000, cache_dir=...)
        metrics = evaluator.evaluate(ema, diffusion, autoencoder)    # {"fid": ..., ...} on rank 0

    Under torch.distributed every rank must call `evaluate` (each samples its share); the result
    is returned on rank 0 and None elsewhere.
    """

    def __init__(self, reference: str | os.PathLike, *, feature_extractor: str | FeatureExtractor = "inception",
                 feature_extractor_weights: str | None = None, allow_download: bool = True,
                 num_samples: int = 5000, sampler: str = "ddpm", num_steps: int = 250, cfg_scale: float = 1.5,
                 guided_channels: int | str = 3, guidance_interval: tuple[int, int] | None = None,
                 label_mode: str = "uniform", seed: int = 0, batch_size: int = 32,
                 cache_dir: str | os.PathLike | None = None, judge_cache_dir: str | None = None,
                 metrics: Iterable[str] = ("fid", "isc", "prc"), device: str | None = "auto"):
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for a covariance, got {num_samples}")
        self.reference_source = reference
        self.feature_extractor = feature_extractor
        self.feature_extractor_weights = feature_extractor_weights
        self.allow_download = allow_download
        self.num_samples = int(num_samples)
        self.sampling = dict(sampler=sampler, num_steps=int(num_steps), cfg_scale=float(cfg_scale),
                             guided_channels=guided_channels, guidance_interval=guidance_interval)
        self.label_mode, self.seed, self.batch_size = label_mode, int(seed), int(batch_size)
        self.cache_dir, self.judge_cache_dir = cache_dir, judge_cache_dir
        self.metrics = set(metrics)
        self.device = device
        self._extractor: FeatureExtractor | None = None
        self._reference: FeatureStats | None = None

    def _prepare(self, image_size: int) -> None:
        if self._extractor is None:
            if isinstance(self.feature_extractor, str):
                self._extractor = build_feature_extractor(
                    self.feature_extractor, weights=self.feature_extractor_weights, device=self.device,
                    allow_download=self.allow_download, image_size=image_size, judge_cache_dir=self.judge_cache_dir)
            else:
                self._extractor = self.feature_extractor
        if self._reference is None:
            self._reference = load_reference(self.reference_source, self._extractor, cache_dir=self.cache_dir,
                                             need_features="prc" in self.metrics or "kid" in self.metrics)

    @torch.no_grad()
    def evaluate(self, model, diffusion, autoencoder, *, rank: int = 0, world_size: int = 1,
                 progress: bool = False) -> dict[str, float] | None:
        from dit.sampling import generate_samples, rank_indices

        model = getattr(model, "module", model)
        image_size = model.config.input_size * autoencoder.downsample_factor
        self._prepare(image_size)
        indices = rank_indices(self.num_samples, self.batch_size, rank, world_size)
        images, labels = generate_samples(
            model, diffusion, autoencoder, indices, seed=self.seed, label_mode=self.label_mode,
            batch_size=self.batch_size, progress=progress, **self.sampling)
        feats = sample_features(images, self._extractor, labels)
        if world_size > 1:
            # Gather per-image features (not images) and put them back in sample order.
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, (indices, feats))
            if rank != 0:
                return None
            order = np.argsort(np.concatenate([g[0] for g in gathered]), kind="stable")
            feats = {k: np.concatenate([g[1][k] for g in gathered])[order] for k in feats}
        return metrics_from_features(
            feats, self._reference, self._extractor.identity, fid="fid" in self.metrics,
            sfid="sfid" in self.metrics, isc="isc" in self.metrics, prc="prc" in self.metrics,
            kid="kid" in self.metrics)
