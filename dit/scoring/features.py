"""Features of a stream of images, batch by batch: FID's mean and covariance accumulated on the
fly in float64, so N images cost O(D^2) memory, not O(N D); only the per-image outputs that a
metric needs whole (pool features for precision/recall and KID, logits for IS) are kept.

    streamed = stream_features(NpzImages("samples.npz"), extractor, moments=("pool",))
    mu, sigma = streamed.moments["pool"]      # equal to feature_statistics(all pool features)

Batches are the extractor's own `batch_size` (Inception's `feature_batch_size`, the judge's 500)
where it has one, so every network call sees the same images as on the whole array: the same
features, bit for bit, as the in-memory path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from dit.scoring.frechet import RunningMoments
from dit.scoring.images import ArrayImages, ImageSource

DEFAULT_BATCH_SIZE = 256  # images per call for extractors that do not say their batch size


@dataclass
class StreamedFeatures:
    """What `stream_features` gathered: `moments[key] = (mu, sigma)`, `kept[key]` the per-image
    outputs kept whole (N, ...), and `correct` (N,) bool where labels and a classifier exist."""

    num_images: int
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    correct: np.ndarray | None = None


def stream_features(images, extractor, *, moments: Iterable[str] = ("pool",), keep: Iterable[str] = (),
                    labels: np.ndarray | None = None, batch_size: int | None = None,
                    progress: bool = False) -> StreamedFeatures:
    """Run `extractor.extract` over `images` (an `ImageSource` or a uint8 array) batch by batch.

    moments: output keys ("pool", "spatial") whose mean/covariance are accumulated (keys the
        extractor does not give are left out).
    keep: output keys stored for every image ("pool", "logits"), in the extractor's dtype.
    labels: (N,) conditioning labels; with an extractor that has `classify`, `correct` says
        per image whether its classifier agrees.
    batch_size: images per call; default the extractor's `batch_size`, else 256.
    """
    source = images if isinstance(images, ImageSource) else ArrayImages(images, "samples")
    n = len(source)
    if n == 0:
        raise ValueError("no images to extract features from")
    classify = getattr(extractor, "classify", None) if labels is not None else None
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (n,):
            raise ValueError(f"need one label per sample: {n} samples, labels shaped {labels.shape}")
    batch_size = int(batch_size or getattr(extractor, "batch_size", None) or DEFAULT_BATCH_SIZE)
    running = {key: RunningMoments() for key in moments}
    keep = tuple(keep)
    kept: dict[str, np.ndarray] = {}
    correct = np.empty(n, dtype=bool) if classify is not None else None
    steps = tqdm(range(0, n, batch_size), desc=f"{getattr(extractor, 'name', 'extractor')} features",
                 disable=not progress, leave=False)
    for start in steps:
        stop = min(start + batch_size, n)
        batch = source.read(start, stop)
        out = extractor.extract(batch)
        for key, value in out.items():
            if len(value) != stop - start:
                raise ValueError(f"the extractor gave {len(value)} {key!r} rows for {stop - start} images")
            if key in running:
                running[key].update(value)
            if key in keep:
                if key not in kept:  # allocated once: no list of batches to concatenate (twice the memory)
                    kept[key] = np.empty((n, *value.shape[1:]), dtype=value.dtype)
                kept[key][start:stop] = value
        if correct is not None:
            correct[start:stop] = classify(batch) == labels[start:stop]
    streamed = StreamedFeatures(n, correct=correct, kept=kept)
    streamed.moments = {key: acc.statistics() for key, acc in running.items() if acc.n > 0}
    return streamed
