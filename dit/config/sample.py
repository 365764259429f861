"""The schemas of sample.py and eval_fid.py: every key and its default in one place; the YAML
files (conf/sample.yaml, conf/eval.yaml, conf/sampler/, conf/vae/) only choose and override.
A wrong type (`bulk.num_samples=abc`) fails when hydra composes, naming the key.

The sampler's own knobs are not written out here: the `sampler` node (`sampler.name`,
`sampler.num_steps`, `sampler.eta`, ...) is derived from `dit.sampling.SamplerSettings`, so a
field added there is a `sampler.<field>` key at once. The guidance knobs sit beside it:
`guided_channels`, `guidance_interval`, the guidance method `guidance` (cfg | autoguidance | apg),
its guide model `guide_checkpoint` and APG's `apg_eta`, `apg_norm_threshold`, `apg_momentum` at
the top, `cfg_scale` per mode (`grid.cfg_scale`, `bulk.cfg_scale`).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from dit.config.checks import check_toy_variant
from dit.config.schema import AutoencoderConfig, ConfigError, WandbConfig
from dit.scoring.inception import check_feature_precision
from dit.scoring.precision_recall import check_pr_arithmetic
from dit.io.release import RELEASE_FORMATS
from dit.sampling.order import LABEL_MODES
from dit.sampling.settings import SamplerSettings

# SamplerSettings fields that are not the sampler's own: set beside the `sampler` node.
_GUIDANCE_FIELDS = ("cfg_scale", "guided_channels", "guidance_interval", "guidance", "apg_eta", "apg_norm_threshold",
                    "apg_momentum")


def _sampler_node_schema() -> type:
    """`name` (= SamplerSettings.sampler) plus every other non-guidance SamplerSettings field,
    with its type and default."""
    hints = typing.get_type_hints(SamplerSettings)
    fields = [("name", str, field(default=SamplerSettings.sampler))]
    for f in dataclasses.fields(SamplerSettings):
        if f.name != "sampler" and f.name not in _GUIDANCE_FIELDS:
            fields.append((f.name, hints[f.name], field(default=f.default)))
    return dataclasses.make_dataclass("SamplerConfig", fields, namespace={
        "__doc__": "conf/sampler/<name>.yaml: which sampler and its knobs (SamplerSettings' fields)."})


SamplerConfig = _sampler_node_schema()


class SampleMode(enum.Enum):
    grid = "grid"  # a PNG of the model's classes, or of those in grid.labels (single process)
    bulk = "bulk"  # bulk.num_samples images to an ADM .npz (all ranks take part)


GRID_LABEL_CHOICES = ("auto", "all")


@dataclass
class GridConfig:
    # auto: the model's own classes, one row of `per_class` images each (every class of a model with
    # at most `max_classes`, else `max_classes` of them evenly spread); all: one image per class;
    # or a list of class ids, one image each (DiT's demo: [207, 360, 387, 974, 88, 979, 417, 279])
    labels: Any = "auto"
    per_class: int = 4  # labels=auto: images per class (one row each)
    max_classes: int = 16  # labels=auto: the most classes (rows) drawn
    cfg_scale: float = 4.0  # the reference demo's guidance
    nrow: Optional[int] = None  # images per row; None: per_class for labels=auto (a row per class), else 4 (DiT's demo)
    out: Optional[str] = None  # PNG path; None: outputs/samples/<checkpoint>-<settings>.png (under the cwd)


@dataclass
class BulkConfig:
    num_samples: int = 50_000
    labels: str = "uniform"  # uniform: independent uniform labels (reference) | balanced: i mod num_classes
    cfg_scale: float = SamplerSettings.cfg_scale  # the FID protocol's
    batch_size: int = 32  # per rank; does not change the samples
    out: Optional[str] = None  # .npz path; None: outputs/samples/<checkpoint>-<settings>.npz (under the cwd)
    keep_shards: bool = False  # keep <out>.parts/ after assembling


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # ours (.pt / .safetensors) or an official release file
    which: str = "ema"  # ema | model: which weights of our checkpoints (release files are EMA)
    model_name: Optional[str] = None  # e.g. DiT-XL/2: fixes the architecture when the shapes cannot tell
    # How a release-format file (a bare state dict) was trained: dit (DDPM) | sit (SiT's flow);
    # None: by its file name (SiT-*.pt is SiT's). Our checkpoints record it and ignore this key.
    release_format: Optional[str] = None
    # vae=pixel|sd-ema|sd-mse|DIR|hub id (conf/vae/); none chosen: the checkpoint's, else sd-ema
    vae: Optional[AutoencoderConfig] = None
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    seed: int = 0  # sample i uses noise and label seeded by (seed, i)
    mode: SampleMode = SampleMode.grid
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # chosen with sampler=ddpm|ddim|dpm++
    guided_channels: str = SamplerSettings.guided_channels  # 3: the paper's; all: every channel
    guidance_interval: Optional[list[float]] = None  # [lo, hi]: DDPM timesteps (0..999) or flow time (0..1); None: always
    # How a guided step mixes (docs/sampling.md, "Guidance methods"): cfg (classifier-free) | autoguidance (the model
    # and the weaker guide_checkpoint, both conditional) | apg (adaptive projected guidance, its knobs apg_*)
    guidance: str = SamplerSettings.guidance
    # guidance=autoguidance: the guide, an earlier or smaller model of the same data and objective (a checkpoint file
    # or a run directory, loaded as `checkpoint` is, with the same `which`)
    guide_checkpoint: Optional[str] = None
    apg_eta: float = SamplerSettings.apg_eta  # apg: the parallel part's weight (0: the paper's; 1: kept, as cfg)
    apg_norm_threshold: Optional[float] = None  # apg: the x0 difference's largest norm per sample (null: no clamp)
    apg_momentum: float = SamplerSettings.apg_momentum  # apg: momentum beta in (-1, 1), the paper's < 0 (0: none)
    grid: GridConfig = field(default_factory=GridConfig)
    bulk: BulkConfig = field(default_factory=BulkConfig)

    def sampler_settings(self, cfg_scale: float) -> SamplerSettings:
        """The SamplerSettings of this config at the given (per-mode) guidance scale."""
        knobs = {k: getattr(self.sampler, k) for k in (f.name for f in dataclasses.fields(self.sampler)) if k != "name"}
        return SamplerSettings(sampler=self.sampler.name, cfg_scale=cfg_scale, guided_channels=self.guided_channels,
                               guidance_interval=self.guidance_interval, guidance=self.guidance, apg_eta=self.apg_eta,
                               apg_norm_threshold=self.apg_norm_threshold, apg_momentum=self.apg_momentum, **knobs)

    def check(self) -> None:
        """Values whose type is right but which cannot work; ConfigError naming the key."""
        if self.release_format not in (None, *RELEASE_FORMATS):
            raise ConfigError(f"release_format={self.release_format!r}: use one of {list(RELEASE_FORMATS)} "
                              "(or leave it out: a file named SiT-*.pt is read as SiT's, any other as DiT's)")
        for key, settings in (("grid", self.sampler_settings(self.grid.cfg_scale)),
                              ("bulk", self.sampler_settings(self.bulk.cfg_scale))):
            try:
                settings.check()
            except ValueError as err:
                raise ConfigError(f"sampler settings ({key} mode): {err}") from None
        if self.guidance == "autoguidance" and not self.guide_checkpoint:
            raise ConfigError("guidance=autoguidance needs guide_checkpoint=... (an earlier or smaller model of the "
                              "same data and objective: a checkpoint file or a run directory)")
        if self.guide_checkpoint and self.guidance != "autoguidance":
            raise ConfigError(f"guide_checkpoint={self.guide_checkpoint} is the guide of guidance=autoguidance: set "
                              f"guidance=autoguidance, or leave guide_checkpoint out (guidance={self.guidance})")
        labels = self.grid.labels
        if labels not in GRID_LABEL_CHOICES and not (
                isinstance(labels, list) and labels and all(isinstance(y, int) and y >= 0 for y in labels)):
            raise ConfigError(f"grid.labels must be 'auto' (the model's classes, a row each), 'all' or a list of class "
                              f"ids >= 0, got {labels!r}")
        for key in ("per_class", "max_classes", "nrow"):
            value = getattr(self.grid, key)
            if value is not None and value < 1:
                raise ConfigError(f"grid.{key} must be >= 1, got {value}")
        if self.bulk.labels not in LABEL_MODES:
            raise ConfigError(f"bulk.labels must be one of {LABEL_MODES}, got {self.bulk.labels!r}")
        for key in ("num_samples", "batch_size"):
            if getattr(self.bulk, key) < 1:
                raise ConfigError(f"bulk.{key} must be >= 1, got {getattr(self.bulk, key)}")
        if self.which not in ("ema", "model"):
            raise ConfigError(f"which must be 'ema' or 'model', got {self.which!r}")


@dataclass
class EvalConfig(SampleConfig):
    """eval_fid.py: score `samples`, or generate them first with the sampling keys above."""

    samples: Optional[str] = None  # an ADM .npz, a folder of images, or None: generate (needs checkpoint)
    reference: str = MISSING  # ADM reference batch, folder of images, or cached statistics .npz
    checkpoint: Optional[str] = None  # only needed to generate (samples=None)
    mode: SampleMode = SampleMode.bulk
    feature_extractor: str = "inception"  # inception (the FID protocol) | toy_judge (the quickstart's)
    feature_extractor_weights: Optional[str] = None  # torch-fidelity's Inception file; None: hub cache or download
    allow_download: bool = True
    feature_batch_size: int = 64
    feature_precision: str = "fp32"  # Inception features in IEEE fp32 (TF32 forced off) | tf32 (allowed)
    judge_seed: int = 0  # toy_judge: which judge (trained once, cached in cache_dir)
    # toy_judge: which toy variant's judge (dit.data.toy.VARIANTS: colours | shapes). None: the variant the
    # checkpoint was trained on (checkpoint=, or the one the samples' settings file names) when
    # that is a toy-set run, else "colours".
    judge_variant: Optional[str] = None
    cache_dir: Optional[str] = "~/.cache/dit"  # reference statistics and the toy judge
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "isc", "prc"])  # + kid
    prc_k: int = 3  # precision/recall neighbourhood (ADM: 3)
    pr_arithmetic: str = "fp32"  # precision/recall distances: fp32 (torch-fidelity) | adm (ADM's fp16, fp32 fallback)
    isc_split_size: int = 5000  # Inception Score splits of this many images (ADM: 5000)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    results_json: Optional[str] = None  # None: <samples>.<feature_extractor>.metrics.json next to the samples
    results_table: Optional[str] = "outputs/results/eval_results.csv"  # CSV, one row per evaluation; None: none
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        super().check()
        for key, check in (("feature_precision", check_feature_precision), ("pr_arithmetic", check_pr_arithmetic)):
            try:
                check(getattr(self, key))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.judge_variant is not None:
            check_toy_variant(self.judge_variant, "judge_variant")


def _to_object(cfg: Any, schema: type, hints: dict[str, str]):
    if isinstance(cfg, schema):  # already the dataclass
        cfg.check()
        return cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        lines = [f"{k}=...  ({hints[k]})" if k in hints else f"{k}=..." for k in missing]
        raise ConfigError("missing mandatory config value(s); set them on the command line:\n  " + "\n  ".join(lines))
    out = OmegaConf.to_object(cfg)
    if not isinstance(out, schema):
        raise ConfigError(f"expected a {schema.__name__} config, got {type(out).__name__}")
    out.check()
    return out


def to_sample_config(cfg: Any) -> SampleConfig:
    """A composed `sample` config -> `SampleConfig`, checked (ConfigError naming the key)."""
    return _to_object(cfg, SampleConfig, {"checkpoint": "ours or an official release file"})


def to_eval_config(cfg: Any) -> EvalConfig:
    """A composed `eval` config -> `EvalConfig`, checked (ConfigError naming the key)."""
    return _to_object(cfg, EvalConfig, {"reference": "an ADM reference batch, a folder of images or cached stats"})
