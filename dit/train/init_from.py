"""Fine-tuning: a new run whose weights start from a file (`init_from=PATH`).

The file may be one of our checkpoints (its `ema` weights by default, `init_from_weights=model`
for the raw ones), an official release file (a plain EMA state dict in the layout of contract 1
in docs/design.md), or any weights-only state dict (`.pt` or `.safetensors`). The weights go into
the model, and the EMA starts as a copy of them; the optimizer is fresh, the step is 0 and every
random stream starts from `seed`, as in a run from scratch: only the initial weights differ.

What may differ between the file and the model this run builds:

* the number of classes: the label table is the model's own freshly initialised one (the
  rows of one label set mean nothing for another), except its null row (id `num_classes`,
  the last row, contract 6), which is copied from the file's null row: it is the label-free
  condition the network was trained with, so unconditional predictions and guidance keep
  working from the first step. With the same number of classes the file's rows are kept (and a
  null row is added or dropped when only `model.class_dropout_prob` changes);
* the image size: `pos_embed` is the fixed sin-cos table of the token grid, never trained, so
  the model keeps its own table for its grid (a fixed table is recomputed, never interpolated).

Anything else that does not fit (depth, width, patch size, channels, MLP ratio, learned sigma,
and, when the file records its config, what no shape shows: attention heads, norms, rotary
embedding, ...) is refused, listing the tensors and their shapes.

Once the run directory has a checkpoint of its own, a relaunch continues from it, as with
`resume=`, and `init_from` is not read again (it may stay on the command line).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dit.io.checkpoint import load_state, read_safetensors_metadata
from dit.config import ConfigError, TrainConfig
from dit.distributed import DistEnv, on_rank_zero
from dit.models import DiT, DiTConfig
from dit.io.release import strip_wrapper_prefixes
from dit.train.resume import resolve_resume_path

log = logging.getLogger(__name__)

INIT_WEIGHTS = ("ema", "model")  # the choices of init_from_weights (for our checkpoints)
LABEL_TABLE = "y_embedder.embedding_table.weight"
POS_EMBED = "pos_embed"
_SHOWN = 12  # mismatched tensors listed by name before "and N more"


@dataclass
class InitWeights:
    """The weights a fine-tune starts from, as read from its file."""

    path: Path
    kind: str  # what the file is, in words, for the log
    state_dict: dict  # official-layout keys (wrapper prefixes removed) -> tensors
    source_config: Optional[dict]  # the DiT config the file records (ours), None for a plain state dict


def _read(spec: str, which: str) -> InitWeights:
    path = resolve_resume_path(spec, key="init_from")
    obj = load_state(path)
    source_config = None
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in INIT_WEIGHTS):
        weights = obj.get(which)
        if not isinstance(weights, dict):
            other = next(k for k in INIT_WEIGHTS if k != which)
            raise ConfigError(f"init_from={spec}: {path} has no {which!r} weights, only {other!r}: set "
                              f"init_from_weights={other}")
        kind = f"our checkpoint{'' if 'step' not in obj else ' at step ' + str(obj['step'])}, {which} weights"
        sd, source_config = weights, obj.get("model_config")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind, sd = "a plain state dict (release or weights-only file)", obj
        if path.suffix == ".safetensors":
            source_config = read_safetensors_metadata(path).get("model_config")
    else:
        shown = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"init_from={spec}: {path} holds no DiT weights (found {shown}); give one of our "
                          "checkpoints, a release file or a state dict (.pt or .safetensors)")
    sd = strip_wrapper_prefixes(sd)
    _check_finite(spec, path, sd)
    return InitWeights(path, kind, sd, dict(source_config) if isinstance(source_config, dict) else None)


def _check_finite(spec: str, path: Path, sd: dict) -> None:
    """NaN/inf in the starting weights would surface only at step 1, as a non-finite update that
    blames the optimizer; name the tensors here, before anything is built or written."""
    bad = [(k, int((~torch.isfinite(v)).sum()), v.numel()) for k, v in sd.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(f"{k} ({n} of {total})" for k, n, total in bad[:5])
        more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
        raise ConfigError(f"init_from={spec}: {path} holds non-finite values (NaN/inf) in {shown}{more}: it comes "
                          "from a diverged run or a damaged file; start from an earlier checkpoint (or "
                          "init_from_weights=model if only the EMA is affected)")


def read_init_from(cfg: TrainConfig, env: DistEnv, state: Optional[dict]) -> Optional[InitWeights]:
    """The weights of `cfg.init_from` when this run starts fresh (`state`, the checkpoint
    `load_start_state` chose, is None), else None. Rank 0 reads the file first; an error
    there is raised on every rank."""
    if not cfg.init_from:
        return None
    if cfg.init_from_weights not in INIT_WEIGHTS:
        raise ConfigError(f"init_from_weights={cfg.init_from_weights!r} is not one of {', '.join(INIT_WEIGHTS)}: "
                          "ema (the averaged weights, default) or model (the raw training weights)")
    if state is not None:
        if (state.get("config") or {}).get("init_from") != cfg.init_from:
            log.warning("init_from=%s is not used: the run continues from %s (init_from only starts a run)",
                        cfg.init_from, state.get("source"))
        return None
    init = on_rank_zero(lambda: _read(cfg.init_from, cfg.init_from_weights), env,
                        lambda failed: ConfigError(f"rank 0 could not read init_from={cfg.init_from} ({failed})"))
    return init if init is not None else _read(cfg.init_from, cfg.init_from_weights)


# --------------------------------------------------------------------------------------
# Fitting the file to the model
# --------------------------------------------------------------------------------------


def _source_labels(rows: int, config: Optional[dict]) -> tuple[int, Optional[int]]:
    """(number of classes, index of the null row or None) of a label table with `rows` rows.
    With the file's own config: its `num_classes`, and a null row at that index when it trained
    with label dropout. Without (a release file): the release convention, `rows - 1` classes and
    the null row last (as `dit.io.release.infer_dit_config` assumes)."""
    if config is None:
        return rows - 1, rows - 1
    classes = int(config.get("num_classes", rows))
    has_null = float(config.get("class_dropout_prob", 0.0)) > 0 and rows == classes + 1
    return classes, (classes if has_null else None)


def _label_table(src: torch.Tensor, model: DiT, config: Optional[dict]) -> tuple[torch.Tensor, Optional[str]]:
    """The label table for `model` from the file's `src`, and a note when it is a new one."""
    classes, src_null = _source_labels(src.shape[0], config)
    c = model.config
    table = model.y_embedder.embedding_table.weight.detach().clone()  # the model's own initialisation
    same_classes = classes == c.num_classes and src.shape[0] >= classes
    if same_classes:
        table[:classes] = src[:classes]
    copy_null = c.class_dropout_prob > 0 and src_null is not None
    if copy_null:
        table[c.num_classes] = src[src_null]
    if same_classes:
        return table, None
    return table, (f"label table: new for {c.num_classes} classes (the file's has {src.shape[0]} rows), "
                   + ("null row copied from the file's" if copy_null else "no null row to copy"))


# DiT fields that may differ between the file and the model; the others must match even where no
# tensor shape shows them (attention heads, norms, rotary embedding, ...).
_MAY_DIFFER = ("input_size", "num_classes", "class_dropout_prob")


def _config_mismatches(config: Optional[dict], model: DiT) -> list[str]:
    if config is None:
        return []
    defaults = DiTConfig()  # a field a record leaves out has its default (`DiTConfig.to_dict`)
    out = []
    for f in dataclasses.fields(DiTConfig):
        ours, theirs = getattr(model.config, f.name), config.get(f.name, getattr(defaults, f.name))
        if f.name not in _MAY_DIFFER and theirs != ours:
            out.append(f"{f.name}: file {theirs} vs model {ours}")
    return out


def fit_to_model(init: InitWeights, model: DiT) -> tuple[dict, list[str]]:
    """(the state dict to load into `model`, notes on what was adapted). The model's freshly
    initialised tensors stand in where the module docstring says; ConfigError, in one line,
    listing every tensor (and recorded architecture field) that does not fit otherwise."""
    own, sd = model.state_dict(), init.state_dict
    fitted, notes, bad = {}, [], _config_mismatches(init.source_config, model)
    for key, target in own.items():
        if key not in sd:
            bad.append(f"{key} missing from the file (model {tuple(target.shape)})")
            continue
        src = sd[key]
        if key == POS_EMBED and src.shape != target.shape and src.ndim == 3 and src.shape[-1] == target.shape[-1]:
            fitted[key] = target  # the fixed sin-cos table of this model's grid
            notes.append(f"pos_embed: the sin-cos table of this model's {target.shape[1]} tokens (the file's: "
                         f"{src.shape[1]})")
        elif key == LABEL_TABLE and src.ndim == 2 and src.shape[1] == target.shape[1]:
            fitted[key], note = _label_table(src, model, init.source_config)
            notes += [note] if note else []
        elif src.shape != target.shape:
            bad.append(f"{key}: file {tuple(src.shape)} vs model {tuple(target.shape)}")
        else:
            fitted[key] = src
    bad += [f"{key} {tuple(sd[key].shape)} not in the model" for key in sd if key not in own]
    if bad:
        listed = "; ".join(bad[:_SHOWN]) + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        raise ConfigError(
            f"init_from={init.path} does not fit the model this run builds ({len(bad)} mismatches; only the "
            f"number of classes and the image size may differ): {listed}. Set model.* (depth, hidden_size, "
            "num_heads, patch_size, ...) and the autoencoder to those the file was trained with"
        )
    return fitted, notes


def apply_init_from(init: InitWeights, model: DiT) -> None:
    """Load `init`'s weights into `model` (before the EMA is made from it: the EMA starts as
    the same weights)."""
    fitted, notes = fit_to_model(init, model)
    model.load_state_dict(fitted, strict=True)
    log.info("fine-tuning from %s (%s)%s", init.path, init.kind, "".join(f"; {n}" for n in notes))
