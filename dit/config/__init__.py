"""The configuration schemas of every entry point, and the checks that run before any work.

The dataclasses are registered in hydra's ConfigStore (`register_configs`), and the YAML files
under `conf/` only *select* and *override* them, so

- a misspelt key or a wrong type fails when hydra composes the config, before any work;
- `python train.py --cfg job` (or sample.py, eval_fid.py) prints every value a run will use;
- library code receives dataclass instances (plain dataclasses, no hydra globals).

Values that depend on the data (number of classes, image or latent size, latent channels) are not
configured: they are read from the data set, so any ImageFolder works unchanged.

    schema.py     training: TrainConfig and its parts
    checks.py     training checks before any work (architecture, resolution, resume)
    sample.py     sample.py / eval_fid.py: SampleConfig, EvalConfig
    overrides.py  command-line rewrites (official model names, vae=DIR), sweep job names
    run_keys.py   which keys define a run (resume, job names, the eval protocol)
"""

from dit.config.checks import (
    check_resolution,
    check_static,
    config_mismatches,
    schema_defaults,
    known_downsample_factor,
    resolve_architecture,
    to_train_config,
)
from dit.config.overrides import flatten_model_overrides, job_dirname, register_resolvers, vae_overrides
from dit.config.sample import (
    BulkConfig,
    EvalConfig,
    GridConfig,
    SampleConfig,
    SampleMode,
    SamplerConfig,
    to_eval_config,
    to_sample_config,
)
from dit.config.run_keys import RESUMABLE_CHANGES
from dit.config.schema import (
    AutoencoderConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DebugConfig,
    DiffusionConfig,
    EMAConfig,
    FaultConfig,
    ImageFolderDataConfig,
    KillHow,
    KillWhen,
    LatentsDataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RepaConfig,
    Parallel,
    Precision,
    SampleGridConfig,
    ToyDataConfig,
    TrainConfig,
    VAEConfig,
    WandbConfig,
    WandbMode,
)


def register_configs() -> None:
    """Put the schemas in hydra's ConfigStore. `conf/train.yaml` starts from `train_schema`,
    `conf/sample.yaml` from `sample_schema`, `conf/eval.yaml` from `eval_schema`; the option files
    of groups with their own schema name it (`defaults: [base_imagefolder]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="data", name="base_imagefolder", node=ImageFolderDataConfig)
    cs.store(group="data", name="base_latents", node=LatentsDataConfig)
    cs.store(group="data", name="base_toy", node=ToyDataConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    register_resolvers()  # ${dit_job_dirname:}, ${dit_run_name:...} in conf/train.yaml


__all__ = [
    "AutoencoderConfig", "BulkConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DebugConfig",
    "DiffusionConfig", "EMAConfig", "EvalConfig", "FaultConfig", "GridConfig", "ImageFolderDataConfig",
    "KillHow", "KillWhen", "LatentsDataConfig", "LogConfig", "ModelConfig", "OptimConfig", "Parallel",
    "Precision", "RESUMABLE_CHANGES", "SampleConfig", "SampleGridConfig", "SampleMode", "SamplerConfig",
    "ToyDataConfig", "TrainConfig", "VAEConfig", "WandbConfig", "WandbMode", "check_resolution", "check_static",
    "config_mismatches", "flatten_model_overrides", "job_dirname", "schema_defaults", "known_downsample_factor", "register_configs",
    "resolve_architecture", "to_eval_config", "to_sample_config", "to_train_config", "vae_overrides",
]
