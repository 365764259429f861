"""Checks of a training config that run before any work: missing values, the architecture,
resolutions, and what may change on resume. They raise ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from dit.autoencoder import KNOWN_VAES, downsample_factor_from_config
from dit.config.run_keys import RESUMABLE_CHANGES
from dit.config.schema import ConfigError, ModelConfig, TrainConfig
from dit.flow import PATHS, PREDICTIONS, TIMESTEP_SAMPLING
from dit.flow.config import OBJECTIVE_KINDS, meanflow_options
from dit.models.layers import check_options, check_rope_head_dim
from dit.models import canonical_model_name, model_arch, option_values
from dit.models.repa import hub_trust_refusal
from dit.data.toy import VARIANTS as TOY_VARIANTS

OBJECTIVES = OBJECTIVE_KINDS  # diffusion, flow, meanflow


def to_train_config(cfg: Any) -> TrainConfig:
    """A composed DictConfig -> `TrainConfig` (nested dataclasses), after checking that no
    mandatory value is missing. Raises ConfigError naming the missing keys."""
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.structured(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hints = {
            "data.root": "the ImageFolder directory (data=imagefolder) or latents cache (data=latents)",
            "vae.name": "a local AutoencoderKL directory (vae=DIR, or vae=local vae.name=DIR)",
            "name": "a run name",
        }
        lines = [f"{k}=...  ({hints[k]})" if k in hints else f"{k}=..." for k in missing]
        raise ConfigError("missing mandatory config value(s); set them on the command line:\n  " + "\n  ".join(lines))
    return OmegaConf.to_object(cfg)


def resolve_architecture(model: ModelConfig) -> dict:
    """The four architecture numbers of `model`: the official table for `model.name`, with any
    field set in the config taking precedence. Raises ConfigError for an unknown name or an
    incomplete custom architecture."""
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
    `pixel`, 8 for the SD VAEs, and from `config.json` for a local diffusers directory (any
    class dit/autoencoder.py reads: AutoencoderKL, AutoencoderDC, ...)."""
    if vae_name == "pixel":
        return 1
    if vae_name in KNOWN_VAES or vae_name in KNOWN_VAES.values():
        return 8
    config_file = Path(vae_name).expanduser() / "config.json"
    if config_file.is_file():
        return downsample_factor_from_config(json.loads(config_file.read_text()))
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
    m = cfg.model
    try:
        check_options(option_values(m))
    except ValueError as err:
        raise ConfigError(f"model.{str(err).removeprefix('model option ')}") from None
    if m.rope:
        try:
            check_rope_head_dim(arch["hidden_size"] // arch["num_heads"])
        except ValueError as err:
            raise ConfigError(f"model.{err}") from None
    check_objective(cfg)
    check_repa(cfg, arch["depth"], world_size)
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
    check_optim_schedule(cfg, world_size)
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
    try:
        s.check()
    except ValueError as err:
        raise ConfigError(f"log.samples: {err}") from None
    if s.guidance == "autoguidance":
        raise ConfigError("log.samples.guidance=autoguidance needs a guide model, which training grids do not load: "
                          "use cfg or apg, and draw autoguided grids with sample.py guide_checkpoint=...")

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
        if data.kind == "toy":
            check_toy_variant(data.variant, "data.variant")
        factor = known_downsample_factor(cfg.vae.name)
        if factor is not None:
            check_resolution(data.image_size, factor, arch["patch_size"])
    else:
        raise ConfigError(f"data.kind={data.kind!r} is not one of imagefolder, latents, toy")


def check_toy_variant(variant: Any, key: str) -> str:
    """ConfigError unless `variant` is one of the toy set's variants; `key` names the config key."""
    if variant not in TOY_VARIANTS:
        raise ConfigError(f"{key}={variant!r} is not a toy variant: use one of {', '.join(TOY_VARIANTS)} (colours: "
                          "a colour per class; shapes: random hues, equal areas, the classes differ by shape only)")
    return variant


def check_repa(cfg: TrainConfig, model_depth: int, world_size: int = 1) -> None:
    """The `repa.*` keys (dit/models/repa.py), only when REPA is on (repa.encoder set)."""
    r = cfg.repa
    if r.encoder is None:
        return
    if not 1 <= r.depth <= model_depth:
        raise ConfigError(f"repa.depth={r.depth} is not a block of this model (depth {model_depth}): "
                          f"use 1..{model_depth} (the paper: 8 of SiT-XL's 28)")
    if not r.coeff >= 0:
        raise ConfigError(f"repa.coeff must be >= 0 (the REPA loss weight; the paper: 0.5), got {r.coeff}")
    for key in ("resolution", "projector_dim"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"repa.{key} must be positive, got {getattr(r, key)}")
    if cfg.parallel.value == "fsdp" and world_size > 1:
        raise ConfigError("REPA with parallel=fsdp is not supported yet (the projector is not sharded): "
                          "use parallel=ddp, or repa.encoder=null")
    if cfg.data.kind != "latents":  # from a latents cache the encoder is only a name: nothing is loaded
        refusal = hub_trust_refusal(r.encoder, r.trust_hub_repo)
        if refusal is not None:
            raise ConfigError(refusal)


def check_objective(cfg: TrainConfig) -> None:
    """The `objective` keys (conf/objective/): their choices, and ranges the flow loss needs."""
    o = cfg.objective
    if o.kind not in OBJECTIVES:
        raise ConfigError(f"objective.kind={o.kind!r} is not one of {', '.join(OBJECTIVES)}: choose with "
                          "objective=diffusion, objective=flow or objective=meanflow")
    if o.kind == "meanflow":
        check_meanflow(cfg)
    if o.kind == "diffusion":
        return
    for key, value, choices in (("path", o.path, PATHS), ("prediction", o.prediction, PREDICTIONS),
                                ("time_sampling", o.time_sampling, TIMESTEP_SAMPLING)):
        if value not in choices:
            raise ConfigError(f"objective.{key}={value!r} is not one of {', '.join(choices)}")
    if not o.logit_std > 0:
        raise ConfigError(f"objective.logit_std must be > 0, got {o.logit_std}")
    if o.cosine_weight < 0:
        raise ConfigError(f"objective.cosine_weight must be >= 0 (0: off), got {o.cosine_weight}")
    if o.cosine_weight and o.prediction != "velocity":
        raise ConfigError("objective.cosine_weight > 0 (the velocity-direction loss) needs "
                          f"objective.prediction=velocity, got {o.prediction}")
    if not o.network_time_scale > 0:
        raise ConfigError(f"objective.network_time_scale must be > 0 (1: t in [0, 1], 1000: DDPM-sized), "
                          f"got {o.network_time_scale}")


def check_meanflow(cfg: TrainConfig) -> None:
    """objective=meanflow: the linear path and (average) velocity prediction it is defined on, and
    the `meanflow` keys (dit/flow/meanflow.py MeanFlowOptions); guidance folded into training needs
    the null class (model.class_dropout_prob > 0)."""
    o = cfg.objective
    for key, value, needed in (("path", o.path, "linear"), ("prediction", o.prediction, "velocity"),
                               ("cosine_weight", o.cosine_weight, 0.0)):
        if value != needed:
            raise ConfigError(f"objective.{key}={value!r} is not supported with objective=meanflow: MeanFlow is "
                              f"defined on the linear path with velocity prediction and no cosine term "
                              f"(use objective.{key}={needed})")
    try:
        options = meanflow_options(dataclasses.asdict(cfg.meanflow))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"meanflow.{err}") from None
    if options.guided and not cfg.model.class_dropout_prob > 0:
        raise ConfigError(f"meanflow.omega={options.omega}, meanflow.kappa={options.kappa} fold guidance into "
                          "training, which needs the null class: set model.class_dropout_prob > 0 (the paper's 0.1), "
                          "or meanflow.omega=1 meanflow.kappa=0 for no guidance")


def check_optim_schedule(cfg: TrainConfig, world_size: int = 1) -> None:
    """Gradient accumulation, the learning-rate schedule and fp16's loss scaling."""
    o = cfg.optim
    k = o.grad_accum_steps
    if k < 1:
        raise ConfigError(f"optim.grad_accum_steps must be >= 1 (1: no accumulation), got {k}")
    if cfg.global_batch_size % (world_size * k):
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} does not split into {world_size} rank(s) x "
            f"optim.grad_accum_steps={k} equal micro-batches: use a global batch that is a multiple of {world_size * k}, "
            "or another optim.grad_accum_steps"
        )
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0 (0: no warmup), got {o.warmup_steps}")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    end = o.decay_steps if o.decay_steps is not None else cfg.max_steps
    if o.schedule.value != "constant" and end <= o.warmup_steps:
        where = "optim.decay_steps" if o.decay_steps is not None else "max_steps (optim.decay_steps is null)"
        raise ConfigError(
            f"optim.schedule={o.schedule.value} decays from the end of the warmup (optim.warmup_steps="
            f"{o.warmup_steps}) to {where}={end}: that must come later; raise it or shorten the warmup"
        )
    if cfg.precision.value == "fp16":
        # inf (or nan) would make every scaled gradient overflow and every step a skip, forever
        if not (math.isfinite(o.loss_scale_init) and o.loss_scale_init > 0) or o.loss_scale_growth_interval < 1:
            raise ConfigError(
                f"optim.loss_scale_init must be positive and finite (65536 by default) and "
                f"optim.loss_scale_growth_interval >= 1, got {o.loss_scale_init} and {o.loss_scale_growth_interval}"
            )
        if world_size > 1 and cfg.parallel.value == "fsdp":
            raise ConfigError("precision=fp16 (a gradient scaler) is not supported with parallel=fsdp: "
                              "use precision=bf16, or parallel=ddp")


def schema_defaults(cfg: Any) -> dict:
    """The schema's default value of every key of `cfg` (a config dataclass), as plain values,
    for the dataclasses `cfg` chose (its data kind, ...). Keys without a default are left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            node = OmegaConf.structured(type(value)())
            out[f.name] = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
        elif f.default is not dataclasses.MISSING and f.default != "???":
            out[f.name] = f.default.value if isinstance(f.default, Enum) else f.default
    return out


def config_mismatches(saved: dict, current: dict, allowed=RESUMABLE_CHANGES, defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two plain config dicts, except `allowed` keys
    and their children. Used to refuse resuming a run directory with a different recipe.

    `defaults` (see `schema_defaults`): a key the saved config lacks (written before the option
    existed) counts as its default, which is what that run did, so adding an option never
    strands older run directories."""

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
    for key, value in flatten(defaults or {}).items():
        a.setdefault(key, value)

    def is_allowed(key):
        return any(key == p or key.startswith(p + ".") for p in allowed)

    return sorted(
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in set(a) | set(b)
        if not is_allowed(k) and a.get(k, "<absent>") != b.get(k, "<absent>")
    )
