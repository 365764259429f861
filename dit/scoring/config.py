"""How generated images are scored, as one object: `ScoringConfig` says which feature extractor
(and its weights, precision, batch size, device), which metrics and how (precision/recall's k and
arithmetic, IS splits, KID subsets), against which reference and where its statistics are
cached. eval_fid.py builds it from EvalConfig, training's `eval.every` from its `eval` node: the
keys have the same names (`ScoringConfig.from_keys`), so the two compute the same numbers.

    config = ScoringConfig.from_keys(cfg, judge_variant="colours")   # cfg: an EvalConfig
    config.metric_options()    # -> MetricOptions(fid=True, sfid=True, isc=True, prc=True, kid=False, ...)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dit.config import ConfigError
from dit.scoring.inception import check_feature_precision
from dit.scoring.metrics import MetricOptions
from dit.scoring.precision_recall import check_pr_arithmetic

# The names of `metrics=[...]`; each switches on one MetricOptions flag.
KNOWN_METRICS = ("fid", "sfid", "isc", "prc", "kid")


def check_metric_names(metrics: Iterable[str], key: str = "metrics", at_least_one: bool = False) -> None:
    """ConfigError naming the unknown entries of `key=[...]` (eval_fid.py's `metrics`, training's
    `eval.metrics`); with `at_least_one`, an empty list too."""
    metrics = list(metrics)
    unknown = sorted(set(metrics) - set(KNOWN_METRICS))
    if unknown:
        raise ConfigError(f"{key}: unknown {unknown}; choose from {list(KNOWN_METRICS)}")
    if at_least_one and not metrics:
        raise ConfigError(f"{key}=[]: choose one or more of {list(KNOWN_METRICS)}")


@dataclass(frozen=True)
class ScoringConfig:
    """Everything that decides how a set of images is scored. `feature_extractor`: "inception"
    (the FID protocol; `feature_extractor_weights`, `allow_download`, `feature_precision` fp32 or
    tf32) or "toy_judge" (`judge_seed`, `judge_variant`: which toy variant's judge). `cache_dir`
    holds the reference statistics (`ref_stats/`) and the toy judges, the layout eval_fid.py and
    training share; None caches nothing. Checked when made: metric names, feature precision and
    precision/recall arithmetic."""

    reference: str | os.PathLike  # ADM reference batch, folder of images, or cached statistics .npz
    metrics: tuple[str, ...] = ("fid", "sfid", "isc", "prc")
    feature_extractor: str = "inception"
    feature_extractor_weights: str | None = None
    allow_download: bool = True
    feature_precision: str = "fp32"
    feature_batch_size: int = 64
    device: str | None = "auto"
    judge_seed: int = 0
    judge_variant: str = "colours"
    cache_dir: str | os.PathLike | None = None
    prc_k: int = MetricOptions.prc_k
    pr_arithmetic: str = MetricOptions.pr_arithmetic
    isc_split_size: int = MetricOptions.isc_split_size
    kid_subsets: int = MetricOptions.kid_subsets
    kid_subset_size: int = MetricOptions.kid_subset_size

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))  # a hydra list, a set: one immutable order
        check_metric_names(self.metrics)
        check_feature_precision(self.feature_precision)
        check_pr_arithmetic(self.pr_arithmetic)

    @classmethod
    def from_keys(cls, keys: Any, **given: Any) -> ScoringConfig:
        """From a config node that names its keys as these fields (EvalConfig, training's
        TrainEvalConfig): the fields it has, then `given` (what it lacks, such as training's
        device, or what the caller resolved, such as the judge variant)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{**{n: getattr(keys, n) for n in names if hasattr(keys, n)}, **given})

    @property
    def reference_cache(self) -> Path | None:
        return Path(self.cache_dir).expanduser() / "ref_stats" if self.cache_dir else None

    @property
    def judge_cache(self) -> str | None:
        return str(Path(self.cache_dir).expanduser()) if self.cache_dir else None

    @property
    def needs_reference_features(self) -> bool:
        """Whether the reference's per-image features are needed (precision/recall, KID), not
        only its statistics."""
        return "prc" in self.metrics or "kid" in self.metrics

    def metric_options(self) -> MetricOptions:
        wanted = set(self.metrics)
        return MetricOptions(fid="fid" in wanted, sfid="sfid" in wanted, isc="isc" in wanted, prc="prc" in wanted,
                             kid="kid" in wanted, prc_k=self.prc_k, pr_arithmetic=self.pr_arithmetic,
                             isc_split_size=self.isc_split_size, kid_subsets=self.kid_subsets,
                             kid_subset_size=self.kid_subset_size)
