"""The evaluator: one reference, one feature extractor and one set of metrics (a `ScoringConfig`),
scoring images from a file (eval_fid.py) or sampled from a model during training (`eval.every`).
The extractor and the reference statistics are built on first use and kept, so an evaluator
made once per run pays for them once.

    evaluator = Evaluator(ScoringConfig(reference="VIRTUAL_imagenet256_labeled.npz", metrics=("fid",)))
    metrics = evaluator.score(images, labels)                       # eval_fid.py: an ImageSource
    plan = SamplePlan(SamplerSettings(), num_samples=5000)
    metrics = evaluator.evaluate(ema, objective, autoencoder, plan)  # {"fid": ..., ...} on rank 0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dit.sampling.guidance import unwrap_model
from dit.sampling.images import SampleOrder, generate_samples, objective_for_model
from dit.sampling.samplers import build_sampler
from dit.sampling.order import rank_indices
from dit.sampling.settings import SamplerSettings
from dit.scoring.config import ScoringConfig
from dit.scoring.extractors import build_feature_extractor
from dit.scoring.images import ImageSource
from dit.scoring.metrics import (FeatureExtractor, FeatureStats, check_reference, compute_metrics, load_reference,
                                 metrics_from_features, sample_features)


@dataclass(frozen=True)
class SamplePlan:
    """The images an evaluation samples from a model: `num_samples` of them with `settings`,
    sample i's noise and label from (`seed`, i) alone (labels drawn as `label_mode` says), in
    network batches of `batch_size`; so the same model gives the same images whatever the number
    of ranks. Checked when made."""

    settings: SamplerSettings
    num_samples: int = 5000
    label_mode: str = "uniform"
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for a covariance, got {self.num_samples}")
        self.settings.check()


class Evaluator:
    """Scores generated images against the reference of `config`, with its extractor and metrics.
    `extractor`: a ready extractor in place of the one `config` names (any object with
    `identity` and `extract`, as in dit.scoring.metrics.FeatureExtractor)."""

    def __init__(self, config: ScoringConfig, extractor: FeatureExtractor | None = None):
        self.config = config
        self._extractor = extractor
        self._reference: FeatureStats | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            raise RuntimeError("the evaluator is not prepared: call prepare(image_size) first")
        return self._extractor

    @property
    def reference(self) -> FeatureStats:
        if self._reference is None:
            raise RuntimeError("the evaluator has no reference yet: call prepare(image_size) first")
        return self._reference

    def prepare(self, image_size: tuple[int, int], reference: bool = True, progress: bool = False) -> None:
        """Build the extractor and (`reference`: the rank that scores) load the reference
        statistics, checked against the samples' (H, W) `image_size`: what scoring needs, so
        that calling this at start-up finds a missing file or weight before any sampling."""
        c = self.config
        if self._extractor is None:
            self._extractor = build_feature_extractor(
                c.feature_extractor, weights=c.feature_extractor_weights, device=c.device,
                batch_size=c.feature_batch_size, allow_download=c.allow_download, image_size=image_size[0],
                judge_cache_dir=c.judge_cache, judge_seed=c.judge_seed, precision=c.feature_precision,
                judge_variant=c.judge_variant)
        if not reference:
            return
        if self._reference is None:
            self._reference = load_reference(c.reference, self._extractor, cache_dir=c.reference_cache,
                                             need_features=c.needs_reference_features, progress=progress)
        check_reference(self._reference, image_size)  # before sampling or extracting

    def score(self, images: ImageSource, labels: np.ndarray | None = None, progress: bool = False) -> dict:
        """The metrics of `images`, read batch by batch (`labels`: their conditioning labels, for
        the toy judge's class accuracy)."""
        self.prepare(images.image_size, progress=progress)
        return compute_metrics(images, self._reference, self._extractor, self.config.metric_options(),
                               labels=labels, progress=progress)

    @torch.no_grad()
    def evaluate(self, model, objective, autoencoder, plan: SamplePlan, *, rank: int = 0, world_size: int = 1,
                 progress: bool = False, on_batch=None) -> dict[str, float] | None:
        """Sample `plan`'s images from `model` and score them. Under torch.distributed every rank
        calls this and samples its share of the indices; the ranks' features are gathered and
        the metrics returned on rank 0, None elsewhere. `on_batch(indices, images, labels)` is
        called after each sampling batch of this rank (an exception it raises ends the evaluation:
        training's preemption check)."""
        model = unwrap_model(model)
        image_size = model.config.input_size * autoencoder.downsample_factor
        self.prepare((image_size, image_size), reference=rank == 0)
        indices = rank_indices(plan.num_samples, plan.batch_size, rank, world_size)
        # checked once per evaluation; objective None: the release chain (DiT's linear 1000 steps)
        sampler = build_sampler(plan.settings, objective_for_model(model, objective), autoencoder)
        order = SampleOrder(seed=plan.seed, batch_size=plan.batch_size, label_mode=plan.label_mode)
        images, labels = generate_samples(model, sampler, autoencoder, indices, order, progress=progress,
                                          on_batch=on_batch)
        feats = sample_features(images, self._extractor, labels) if len(indices) else None  # more ranks than blocks
        if world_size > 1:
            # Gather per-image features (not images) and put them back in sample order.
            import torch.distributed as dist

            gathered = [None] * world_size
            dist.all_gather_object(gathered, (indices, feats))
            if rank != 0:
                return None
            gathered = [g for g in gathered if g[1] is not None]
            order = np.argsort(np.concatenate([g[0] for g in gathered]), kind="stable")
            feats = {k: np.concatenate([g[1][k] for g in gathered])[order] for k in gathered[0][1]}
        return metrics_from_features(feats, self._reference, self._extractor.identity, self.config.metric_options(),
                                     image_size=(image_size, image_size))

    def scoring_record(self) -> dict:
        """How the scores were computed, for the results JSON: the feature precision asked for and
        torch's flags seen during the (last) extraction (None for extractors without the switch),
        precision/recall's arithmetic (None when not computed) and k, and for the toy judge which
        toy variant's judge scored (`judge_variant`; the key is absent for other extractors)."""
        c, extractor = self.config, self.extractor
        pr_arithmetic = c.pr_arithmetic if "prc" in c.metrics else None
        record = {"feature_precision": getattr(extractor, "precision", None),
                  "backend_flags_during_extraction": getattr(extractor, "backend_flags", None),
                  "pr_arithmetic": pr_arithmetic, "prc_k": c.prc_k if pr_arithmetic else None}
        if c.feature_extractor == "toy_judge":
            record["judge_variant"] = c.judge_variant
        return record
