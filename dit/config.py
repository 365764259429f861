"""The training configuration schema: every knob of `train.py` and its default, in one place.

The dataclasses below are registered in hydra's ConfigStore (`register_configs`), and the YAML
files under `conf/` only *select* and *override* them, so

- a misspelt key or a wrong type fails when hydra composes the config, before any work;
- `python train.py --cfg job` prints every value a run will use;
- library code receives a `TrainConfig` instance (plain dataclasses, no hydra globals).

Values that depend on the data (number of classes, image or latent size, latent channels) are not
configured: they are read from the data set, so any ImageFolder works unchanged.
"""

from __future__ import annotations

import enum
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # torch.autocast(bfloat16) around the forward pass and the loss


class Parallel(enum.Enum):
    ddp = "ddp"  # DistributedDataParallel: full replica per rank (the reference's choice)
    fsdp = "fsdp"  # FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded


class WandbMode(enum.Enum):
    online = "online"
    offline = "offline"  # written under <run dir>/wandb; `wandb sync` uploads it later
    disabled = "disabled"


# --------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A DiT. `name` is an official name (`DiT-XL/2`); the four architecture fields default to
    that model's values (the table in `dit/models.py`) and can be set one by one
    (`model.depth=6`) for small experiments. With `name: null` all four must be set."""

    name: Optional[str] = "DiT-XL/2"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (the paper's 0.1)
    learn_sigma: bool = True  # predict the variance too (DiT's hybrid loss)


@dataclass
class DataConfig:
    """Fields shared by every data source; `kind` selects the subclass."""

    kind: str = MISSING
    num_workers: int = 4  # DataLoader worker processes per rank (0: load in the training process)


@dataclass
class ImageFolderDataConfig(DataConfig):
    """Images in `root/<class>/<image>` (labels = sorted folder names), ADM center crop to
    `image_size`, random horizontal flip; encoded by the autoencoder on the fly."""

    kind: str = "imagefolder"
    root: str = MISSING
    image_size: int = 256
    hflip: bool = True
    skip_bad: bool = False  # skip unreadable images with a warning instead of failing


@dataclass
class LatentsDataConfig(DataConfig):
    """A latents cache written by `python -m dit.cache_latents` (posterior moments of each image
    and its mirror); the image size, latent shape and autoencoder come from the cache."""

    kind: str = "latents"
    root: str = MISSING
    image_size: Optional[int] = None  # None: the cache's; set: must equal the cache's (a check)
    hflip: bool = True  # pick the stored mirror at random (needs a cache built with flips)


@dataclass
class ToyDataConfig(DataConfig):
    """The built-in toy set (`dit/toy.py`): ten classes of coloured shapes drawn from `seed`."""

    kind: str = "toy"
    num_per_class: int = 100
    image_size: int = 32
    seed: int = 0  # which images; the training seed (`seed`) fixes the order and the flips
    hflip: bool = True
    num_workers: int = 0  # the images are in memory already


@dataclass
class VAEConfig:
    """The autoencoder: `pixel` (identity), `sd-ema`, `sd-mse`, a hub id or a local directory
    written by `AutoencoderKL.save_pretrained`. Chosen with `vae=...` (default `sd-ema`, the
    paper's, in conf/train.yaml); `vae=local vae.name=DIR` for a directory."""

    name: str = MISSING
    scale_factor: Optional[float] = None  # None: the VAE's own (0.18215 for the SD VAEs)
    sample_posterior: bool = True  # train on posterior samples (the reference) or on the mean


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"  # betas 1e-4 ... 0.02
    diffusion_steps: int = 1000


@dataclass
class OptimConfig:
    """AdamW, constant learning rate (the paper: lr 1e-4, no weight decay, no warmup)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # max global grad norm; None: no clipping (the paper)
    fused: Optional[bool] = None  # fused AdamW kernel; None: on (CPU and CUDA) except under FSDP


@dataclass
class EMAConfig:
    decay: float = 0.9999  # the paper's EMA of the weights, updated after every step


@dataclass
class CheckpointConfig:
    every: int = 50_000  # steps between checkpoints (one is also written at the end)
    # Also save when this many minutes have passed since the last save (checked every log.every
    # steps), so a preempted or crashed job loses at most about this much work. None: off.
    every_minutes: Optional[float] = 60.0
    keep_last: Optional[int] = 3  # delete older checkpoints beyond the newest N; None keeps all
    keep_every: Optional[int] = None  # also keep every checkpoint whose step is a multiple of this


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "dit"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SampleGridConfig:
    """Sample grids from the EMA model (fixed noise and classes) every `every` steps, written as
    PNG under `<run dir>/samples/` and logged to wandb. 0 turns them off."""

    every: int = 10_000
    num_images: int = 16
    cfg_scale: float = 4.0
    sampler: str = "ddpm"
    num_steps: int = 100
    guided_channels: str = "3"  # "3": the paper's (first 3 latent channels); "all"


@dataclass
class LogConfig:
    every: int = 100  # steps between metric lines (loss averaged over ranks and steps)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)


@dataclass
class FaultConfig:
    """What a run does when something goes wrong (docs/reliability.md)."""

    # A step whose loss or gradient is NaN/inf is skipped (no optimizer or EMA update) and
    # counted; after this many consecutive such steps the run stops with an error, leaving the
    # newest checkpoint as it was. null: no per-step check (saves one host sync per step); a
    # non-finite mean loss then stops the run at the next log step.
    max_nonfinite_steps: Optional[int] = 10
    # On these signals (what SLURM and torchrun send before stopping a job) the run writes a
    # checkpoint at the next step boundary and exits with `preempt_exit_code`. A handler that
    # was installed before (submitit's requeue on SIGUSR2) is called after the checkpoint.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    preempt_exit_code: int = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, run me again"
    # Collectives (and so every rank, when one rank dies or hangs) fail after this long. It must
    # exceed the longest wait of one rank for another: a checkpoint write or a sample grid on rank 0.
    dist_timeout_minutes: float = 30.0


class KillWhen(enum.Enum):
    after_step = "after_step"  # right after the step (and its checkpoint, if one is due)
    mid_step = "mid_step"  # after the backward pass, before the optimizer update
    checkpoint_write = "checkpoint_write"  # halfway through writing a checkpoint at that step (rank 0)


class KillHow(enum.Enum):
    sigkill = "sigkill"  # kill -9: no cleanup, no final checkpoint
    hang = "hang"  # stop responding forever (a stuck rank; for collective-timeout tests)


@dataclass
class DebugConfig:
    """Fault injection for tests of crash recovery; never set in real runs."""

    kill_at_step: Optional[int] = None  # kill this process at that step (1-based, as logged) ...
    kill_when: KillWhen = KillWhen.after_step  # ... at this point of the step ...
    kill_how: KillHow = KillHow.sigkill  # ... in this way ...
    kill_rank: Optional[int] = None  # ... on this rank only (None: every rank)
    nan_loss_at_steps: list[int] = field(default_factory=list)  # these steps' losses become NaN
    nan_grad_at_steps: list[int] = field(default_factory=list)  # one gradient entry becomes inf


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = MISSING  # one of the DataConfig subclasses, chosen with `data=...`
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    name: str = MISSING  # run name: the run directory is outputs/<name>, and the wandb run name
    seed: int = 0  # fixes init, data order, flips, diffusion noise and timesteps
    global_batch_size: int = 256  # summed over ranks; each rank gets global_batch_size / world
    max_steps: int = 400_000  # optimizer steps (the paper's model comparisons use 400K)
    precision: Precision = Precision.fp32
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (as the reference training script)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    parallel: Parallel = Parallel.ddp
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    # Checkpoint file or run directory to start from when the run directory has no checkpoint
    # yet (a checkpoint in the run directory always wins: it is this run's own progress).
    resume: Optional[str] = None


# Keys that may change when a run is resumed: how long it runs, how it reports, how fast it is.
# Everything else defines the run; a mismatch in the run directory is refused (see
# `config_mismatches`).
RESUMABLE_CHANGES = (
    "max_steps", "ckpt", "log", "fault", "debug", "resume", "data.num_workers", "data.root", "compile",
    "grad_checkpointing", "device", "name",
)


def register_configs() -> None:
    """Put the schema in hydra's ConfigStore. `conf/train.yaml` starts from `train_schema`, and
    the option files of groups with their own schema name it (`defaults: [base_imagefolder]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="data", name="base_imagefolder", node=ImageFolderDataConfig)
    cs.store(group="data", name="base_latents", node=LatentsDataConfig)
    cs.store(group="data", name="base_toy", node=ToyDataConfig)


# --------------------------------------------------------------------------------------
# Helpers used before any work starts
# --------------------------------------------------------------------------------------

_OFFICIAL_NAME = re.compile(r"\bDiT-(\w+)/(\d+)\b")


def flatten_model_overrides(args: list[str]) -> list[str]:
    """`model=DiT-XL/2` -> `model=DiT-XL-2` in command-line overrides.

    Hydra reads a slash in an option as a sub-folder, and sweep directories named after such a
    value would nest; the option files are therefore named `DiT-XL-2.yaml` (each holds the
    official `name: DiT-XL/2`). This lets users type the official names anyway, including in
    sweeps (`model=DiT-S/2,DiT-B/2`)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "model":
            arg = key + "=" + _OFFICIAL_NAME.sub(r"DiT-\1-\2", value)
        out.append(arg)
    return out


def to_train_config(cfg: Any) -> TrainConfig:
    """A composed DictConfig -> `TrainConfig` (nested dataclasses), after checking that no
    mandatory value is missing. Raises ConfigError naming the missing keys."""
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.structured(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hints = {
            "data.root": "the ImageFolder directory (data=imagefolder) or latents cache (data=latents)",
            "vae.name": "a local AutoencoderKL directory (vae=local)",
            "name": "a run name",
        }
        lines = [f"{k}=...  ({hints[k]})" if k in hints else f"{k}=..." for k in missing]
        raise ConfigError("missing mandatory config value(s); set them on the command line:\n  " + "\n  ".join(lines))
    return OmegaConf.to_object(cfg)


def resolve_architecture(model: ModelConfig) -> dict:
    """The four architecture numbers of `model`: the official table for `model.name`, with any
    field set in the config taking precedence. Raises ConfigError for an unknown name or an
    incomplete custom architecture."""
    from dit.models import canonical_model_name, model_arch

    fields = ("depth", "hidden_size", "num_heads", "patch_size")
    if model.name is not None:
        try:
            arch = model_arch(canonical_model_name(model.name))
        except ValueError as err:
            raise ConfigError(f"model.name: {err}") from None
    else:
        arch = {}
    for key in fields:
        value = getattr(model, key)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"model.{key} must be positive, got {value}")
            arch[key] = value
    unset = [f"model.{k}" for k in fields if k not in arch]
    if unset:
        raise ConfigError(f"model.name is null, so {', '.join(unset)} must be set (or pick an official model)")
    if arch["hidden_size"] % arch["num_heads"]:
        raise ConfigError(
            f"model.hidden_size={arch['hidden_size']} is not divisible by model.num_heads={arch['num_heads']}"
        )
    return arch


def known_downsample_factor(vae_name: str) -> Optional[int]:
    """The autoencoder's spatial downsampling, when it is known without loading weights: 1 for
    `pixel`, 8 for the SD VAEs, and from `config.json` for a local diffusers directory."""
    from dit.autoencoder import KNOWN_VAES

    if vae_name == "pixel":
        return 1
    if vae_name in KNOWN_VAES or vae_name in KNOWN_VAES.values():
        return 8
    config_file = Path(vae_name).expanduser() / "config.json"
    if config_file.is_file():
        import json

        blocks = json.loads(config_file.read_text()).get("block_out_channels")
        if blocks:
            return 2 ** (len(blocks) - 1)
    return None


def check_resolution(image_size: int, downsample_factor: int, patch_size: int, where: str = "data.image_size") -> int:
    """The latent side for `image_size`, or ConfigError if the image is not a multiple of
    downsample factor x patch size."""
    unit = downsample_factor * patch_size
    if image_size <= 0 or image_size % unit:
        hint = max(unit, round(image_size / unit) * unit)
        raise ConfigError(
            f"{where}={image_size} is not divisible by the autoencoder's downsampling factor "
            f"{downsample_factor} x model.patch_size {patch_size} = {unit}: the latent grid must split "
            f"into whole patches. Use a multiple of {unit} (e.g. {hint}) or a smaller patch size."
        )
    return image_size // downsample_factor


def check_static(cfg: TrainConfig, world_size: int = 1) -> None:
    """Everything that can be checked from the config alone (no data read, no weights loaded).
    Raises ConfigError naming the key."""
    arch = resolve_architecture(cfg.model)
    if not 0.0 <= cfg.model.class_dropout_prob < 1.0:
        raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {cfg.model.class_dropout_prob}")
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % world_size:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} must be a positive multiple of the number of "
            f"ranks ({world_size}): each rank trains on global_batch_size / ranks samples"
        )
    if cfg.max_steps <= 0:
        raise ConfigError(f"max_steps must be positive, got {cfg.max_steps}")
    for key, value in (("ckpt.every", cfg.ckpt.every), ("log.every", cfg.log.every)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.ckpt.every_minutes is not None and cfg.ckpt.every_minutes <= 0:
        raise ConfigError(f"ckpt.every_minutes must be positive or null (off), got {cfg.ckpt.every_minutes}")
    if cfg.ckpt.keep_last is not None and cfg.ckpt.keep_last < 1:
        raise ConfigError(f"ckpt.keep_last must be >= 1 or null (keep all), got {cfg.ckpt.keep_last}")
    if not 0.0 <= cfg.ema.decay <= 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1], got {cfg.ema.decay}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    f = cfg.fault
    if f.max_nonfinite_steps is not None and f.max_nonfinite_steps < 1:
        raise ConfigError(f"fault.max_nonfinite_steps must be >= 1 or null (no check), got {f.max_nonfinite_steps}")
    unknown = [name for name in f.preempt_signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
    if unknown:
        raise ConfigError(f"fault.preempt_signals: unknown signal(s) {unknown}; use names such as SIGTERM, SIGUSR1")
    if not 1 <= f.preempt_exit_code <= 255:
        raise ConfigError(f"fault.preempt_exit_code must be in 1..255 (0 would read as success), got {f.preempt_exit_code}")
    if f.dist_timeout_minutes <= 0:
        raise ConfigError(f"fault.dist_timeout_minutes must be positive, got {f.dist_timeout_minutes}")
    s = cfg.log.samples
    if s.every < 0 or (s.every and s.num_images <= 0):
        raise ConfigError("log.samples.every must be >= 0 and log.samples.num_images positive")
    if s.guided_channels != "all" and not s.guided_channels.isdigit():
        raise ConfigError(f"log.samples.guided_channels must be a channel count or 'all', got {s.guided_channels!r}")

    data = cfg.data
    if data.kind in ("imagefolder", "latents"):
        root = Path(data.root).expanduser()
        if not root.is_dir():
            what = "ImageFolder directory" if data.kind == "imagefolder" else "latents cache directory"
            raise ConfigError(f"data.root={data.root} does not exist or is not a directory: set it to the {what}")
    if data.kind == "latents":
        if not (root / "meta.json").is_file():
            raise ConfigError(
                f"data.root={data.root} is not a complete latents cache (no meta.json): build it with "
                "`python -m dit.cache_latents ...`, or rerun that command to finish an interrupted build"
            )
    elif data.kind in ("imagefolder", "toy"):
        factor = known_downsample_factor(cfg.vae.name)
        if factor is not None:
            check_resolution(data.image_size, factor, arch["patch_size"])
    else:
        raise ConfigError(f"data.kind={data.kind!r} is not one of imagefolder, latents, toy")


def config_mismatches(saved: dict, current: dict, allowed=RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two plain config dicts, except `allowed` keys
    and their children. Used to refuse resuming a run directory with a different recipe."""

    def flatten(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flatten(saved), flatten(current)

    def is_allowed(key):
        return any(key == p or key.startswith(p + ".") for p in allowed)

    return sorted(
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in set(a) | set(b)
        if not is_allowed(k) and a.get(k, "<absent>") != b.get(k, "<absent>")
    )
