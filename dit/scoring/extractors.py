"""Feature extractors by name: what `feature_extractor=` (eval_fid.py) and `eval.feature_extractor`
(training) choose between.

    extractor = build_feature_extractor("inception", weights="pt_inception-2015-12-05.pth")
    extractor = build_feature_extractor("toy_judge", image_size=32, judge_cache_dir="~/.cache/dit")
"""

from __future__ import annotations

from dit.scoring.inception import InceptionFeatures
from dit.scoring.judge import JudgeFeatures, ToyJudge
from dit.scoring.metrics import FeatureExtractor

EXTRACTORS = ("inception", "toy_judge")


def build_feature_extractor(name: str = "inception", *, weights: str | None = None, device: str | None = "auto",
                            batch_size: int = 64, allow_download: bool = True, image_size: int | None = None,
                            judge_cache_dir: str | None = None, judge_seed: int = 0,
                            precision: str = "fp32", judge_variant: str = "colours") -> FeatureExtractor:
    """`"inception"` (FID protocol; `precision` fp32 or tf32) or `"toy_judge"` (quickstart; needs
    `image_size`, trained once per `judge_variant` (dit.data.toy.VARIANTS) and cached in `judge_cache_dir`)."""
    if name == "inception":
        return InceptionFeatures(weights, device=device, batch_size=batch_size, allow_download=allow_download,
                                 precision=precision)
    if name == "toy_judge":
        if image_size is None:
            raise ValueError("feature_extractor=toy_judge needs the image size of the samples")
        return JudgeFeatures(ToyJudge.load_or_train(judge_cache_dir, image_size=image_size, seed=judge_seed,
                                                    variant=judge_variant))
    raise ValueError(f"unknown feature_extractor {name!r}: use 'inception' or 'toy_judge'")
