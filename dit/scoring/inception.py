"""torch-fidelity's TF-compatible InceptionV3 as a feature extractor: the 2015 graph the FID
literature uses, with TF1's bilinear resize; pool_3 features, the unbiased logits and ADM's
spatial features for sFID. Its weights file is found on disk, in torch hub's cache, or
downloaded; it is read once, with a weights-only load, and torch-fidelity gets the tensors, never
the path (which it would reopen and unpickle fully).

We use torch-fidelity's network and metric kernels but not its top-level API, for reasons
documented in its source (the statistics are ours, in `dit.scoring.metrics`):

- its FID asserts that `mu` and `sigma` share a dtype, yet it builds `mu` as float32 and `sigma`
  as float64, and ADM reference files store both as float64: we keep everything float64;
- its on-disk cache key is the input's name and the extractor's name, not the weights file nor
  the number of images: our cache key includes the weights digest, the file identity and N;
- its high-level API defaults to `cuda=True`: we pass the device explicitly.

Features are computed in IEEE float32 by default (`precision="fp32"`): torch runs cuDNN
convolutions in TF32 on Ampere/Hopper GPUs unless told otherwise, and FID against ADM's fixed
reference statistics moves with the feature precision. `precision="tf32"` allows TF32 (faster,
not the protocol); it is part of the extractor's identity, so cached statistics never mix them.
The flags are set around each extraction (`dit.sampling.precision.tf32_flags`) and restored after.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from dit.io.images import check_images
from dit.sampling.precision import backend_flags, tf32_flags

# torch-fidelity's InceptionV3 weights, converted from the TF 2015-12-05 graph that FID uses.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# ADM's sFID: the first 7 channels of the `mixed_6/conv` activation (17x17), flattened channel-last
# (TF is NHWC). torch-fidelity's weight converter maps TF `mixed_6/conv` to `Mixed_6d.branch1x1`.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
FEATURE_PRECISIONS = ("fp32", "tf32")  # IEEE float32 (the protocol) | TF32 convolutions and matmuls allowed


def check_feature_precision(precision: str) -> str:
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"unknown feature_precision {precision!r}: use 'fp32' (IEEE float32, TF32 off: the "
                         "protocol) or 'tf32' (TF32 convolutions and matmuls on Ampere+ GPUs)")
    return precision


class FeatureExtractorUnavailable(RuntimeError):
    """The feature extractor's weights are neither on disk nor downloadable."""


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


def load_plain_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights file read once: its bytes are hashed (the extractor's identity) and loaded with
    `weights_only=True` from memory, so what is checked, hashed and used is the same content even
    if the file is swapped meanwhile. A file with anything but tensors and containers is refused
    without running it. Returns (state dict, sha256 of the bytes)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FeatureExtractorUnavailable(_missing_weights_message(f"cannot read {path} ({err})")) from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"refusing {path}: not a plain tensor state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not an InceptionV3 state dict (expected a dict of tensors)")
    return state, hashlib.sha256(data).hexdigest()


def _in_memory_file(state: dict[str, torch.Tensor]) -> io.BytesIO:
    """torch-fidelity loads its weights with `torch.load(..., weights_only=False)` from what it is
    given: a buffer that we serialized ourselves from tensors already loaded safely, never the
    path, which it would reopen (and whose content an attacker could have swapped after our check)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


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
        precision: "fp32" (TF32 forced off during extraction) or "tf32" (forced on).
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
                 batch_size: int = 64, allow_download: bool = True, precision: str = "fp32"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.precision = check_feature_precision(precision)
        path = resolve_inception_weights(weights, allow_download)
        state, digest = load_plain_state_dict(path)
        self.weights_path = path
        # fp32 keeps the identity of before (results tables, caches); other precisions say so
        self.identity = f"inception-v3-compat:{digest[:16]}" + ("" if precision == "fp32" else f":{precision}")
        self.backend_flags: dict | None = None  # torch's precision flags during the last extraction
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=_in_memory_file(state)
        ).to(self.device)
        del state
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
        with tf32_flags(self.precision == "tf32"):
            self.backend_flags = backend_flags()
            for i in tqdm(range(0, len(images), self.batch_size), desc="inception features", disable=not progress,
                          leave=False):
                batch = torch.from_numpy(images[i : i + self.batch_size]).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
                batch = batch.to(self.device)
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
