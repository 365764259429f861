"""Run-directory checkpoints and exact resume.

A run directory holds `checkpoints/<step:07d>.pt` (our checkpoint file: contract 2 in
docs/design.md), written atomically; a relaunch continues from the newest one that reads back,
refusing one whose recipe differs from the config (a different run in the same directory).
The lock that keeps a second run out of the directory is dit/train/lock.py.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from dit.io.checkpoint import (CheckpointError, CheckpointWriteError, list_checkpoints, load_state,
                               newest_intact_checkpoint, run_checkpoints, save_atomic, with_checksum)
from dit.config import ConfigError, TrainConfig, config_mismatches, schema_defaults
from dit.distributed import (
    DistEnv,
    broadcast_object,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    on_rank_zero,
)
from dit.train.faults import NO_FAULTS, Faults, NonFiniteTrainingError, nonfinite_entries
from dit.train.randomness import rng_state

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
# Temp files of `dit.io.checkpoint.save_atomic` (".0000100.pt.<pid>.<hex>.tmp"), left behind when a
# write was killed: never loaded (`dit.io.checkpoint.CHECKPOINT_NAME` excludes them), removed at the next start.
_CKPT_TEMP = re.compile(r"^\.\d+\.pt\..*\.tmp$")
_REQUIRED_KEYS = ("model", "ema", "opt", "step")


def plain_config(cfg: TrainConfig) -> dict:
    """The config as plain Python values (enums as strings), for checkpoints and wandb."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


# --------------------------------------------------------------------------------------
# The checkpoints of a run directory
# --------------------------------------------------------------------------------------


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{step:07d}.pt"


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep_last: Optional[int], keep_every: Optional[int] = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and those at multiples of
    `keep_every`). Returns the deleted paths."""
    if keep_last is None:
        return []
    found = list_checkpoints(ckpt_dir)
    deleted = []
    for step, path in found[: max(0, len(found) - keep_last)]:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


def remove_interrupted_writes(ckpt_dir: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that were killed midway. Returns their paths."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = [ckpt_dir / name for name in os.listdir(ckpt_dir) if _CKPT_TEMP.match(name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def read_training_checkpoint(path: Path) -> dict:
    """A checkpoint of ours, checked to hold what a resume needs. Raises CheckpointError (file
    unreadable, truncated, or not a training checkpoint) or UnsafeCheckpointError."""
    state = load_state(path)
    missing = [k for k in _REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this code (no {', '.join(missing)})")
    return state


def newest_readable_checkpoint(ckpt_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the newest checkpoint in `ckpt_dir` that loads, or (None, None) if there
    is none. A newer one that does not load (truncated by a crash outside our atomic write,
    bit rot, a bad copy) is renamed to `<name>.corrupt`, out of the way of resuming and pruning,
    with a warning naming it and the checkpoint used instead. A file that would run code is not
    skipped quietly: UnsafeCheckpointError. Call on one rank only (it renames files)."""
    path, state, bad = newest_intact_checkpoint(ckpt_dir, read_training_checkpoint)
    if path is not None:
        for corrupt, err in bad:
            aside = corrupt.with_name(corrupt.name + ".corrupt")
            os.replace(corrupt, aside)
            log.warning("checkpoint %s is unreadable (%s); resuming from the previous one, %s, instead "
                        "(the unreadable file is kept as %s)", corrupt, err, path, aside.name)
        return path, state
    if bad:
        listed = "; ".join(f"{p.name}: {e}" for p, e in bad)
        raise CheckpointError(
            f"no checkpoint in {ckpt_dir} can be read ({listed}). Move them away to start the run over, or "
            "set resume=<a good checkpoint> in a new run directory"
        )
    return None, None


def resolve_resume_path(path: str, key: str = "resume") -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory (or of its checkpoints/).
    `key` names the config key in the error (`resume`, `init_from`)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    found = run_checkpoints(p)
    if found:
        return found[-1][1]
    what = "a directory without checkpoints" if p.is_dir() else "no such file or directory"
    raise ConfigError(f"{key}={path}: {what}; give a checkpoint file or a run directory that holds checkpoints")


def weights_file_kind(obj) -> str:
    """What a loaded file that is not one of our training checkpoints holds, in words (for
    errors): a plain state dict (a release or weights-only file), or our weights without the
    training state."""
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("model", "ema")):
        return "DiT weights without the training state"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "a plain state dict (a release or weights-only file)"
    return f"a {type(obj).__name__}, not a checkpoint of this code"


def read_resume_checkpoint(path: Path) -> dict:
    """The training checkpoint `resume=` names. A file that is not one (a release file, a
    weights-only file) is refused in one line pointing to init_from=, before any config is
    compared."""
    state = load_state(path)
    missing = [k for k in _REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(
            f"resume={path} is not a training checkpoint of this code ({weights_file_kind(state)}: no "
            f"{', '.join(missing)}); resume= continues a run with its optimizer and step. To start a new run "
            f"from these weights (fresh optimizer, step 0), use init_from={path}"
        )
    return state


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


def _find_resume(cfg: TrainConfig, ckpt_dir: Path) -> tuple[Optional[Path], bool, Optional[dict]]:
    """(checkpoint to start from, whether it is this run directory's own, its state if read)."""
    own, state = newest_readable_checkpoint(ckpt_dir)
    if own is not None:
        return own, True, state
    if cfg.resume:
        path = resolve_resume_path(cfg.resume)
        return path, False, read_resume_checkpoint(path)
    return None, False, None


def load_start_state(cfg: TrainConfig, ckpt_dir: Path, config_dict: dict,
                     env: Optional[DistEnv] = None) -> Optional[dict]:
    """The checkpoint to continue from (this run directory's newest readable one, else
    `cfg.resume`), or None (then `cfg.init_from`, if set, gives the weights:
    dit/train/init_from.py). A checkpoint in the run directory whose recipe differs from `cfg` is
    refused. Rank 0 chooses (and moves unreadable checkpoints aside); the other ranks load its
    choice. The state's "source" entry is the path it was read from."""
    env = env or DistEnv(0, 0, 1, torch.device("cpu"))
    if cfg.resume and cfg.init_from:
        raise ConfigError(
            f"resume={cfg.resume} and init_from={cfg.init_from} are both set: resume= continues a run (its "
            "optimizer, step and data position), init_from= starts a new one from weights; keep one of them"
        )
    if env.is_main:
        for path in remove_interrupted_writes(ckpt_dir):
            log.info("removed %s, left by a checkpoint write that was interrupted", path.name)
    # Every rank learns rank 0's outcome, so that none waits for the others after an error.
    found = on_rank_zero(lambda: _find_resume(cfg, ckpt_dir), env, lambda failed: RuntimeError(
        f"rank 0 could not choose the checkpoint to resume from ({failed})"))
    choice, state = (None, False), None
    if found is not None:  # rank 0
        source, own, state = found
        choice = (None if source is None else str(source), own)
    source, own = broadcast_object(choice, env)
    if source is None:
        return None
    source = Path(source)
    if state is None:
        state = load_state(source)
    differ = config_mismatches(state.get("config") or {}, config_dict, defaults=schema_defaults(cfg))
    if differ and own:
        raise ConfigError(
            f"the run directory {ckpt_dir.parent} holds a run with a different configuration:\n  "
            + "\n  ".join(differ)
            + "\nStart a new run with name=<new name> (or hydra.run.dir=...), or continue from this run "
            "on purpose with resume=<its checkpoint> in a new directory"
        )
    if differ:
        log.warning("resuming from %s with a changed configuration:\n  %s", source, "\n  ".join(differ))
    log.info("resuming from %s (step %d)", source, state["step"])
    return {**state, "source": str(source), "own": own}


def check_checkpoint_fits(state: dict, model_config: dict, cfg: TrainConfig) -> None:
    """ConfigError, before any training, if the checkpoint to resume holds another DiT than the
    one this config and data build (e.g. a latents cache of another shape or class count)."""
    stored = state.get("model_config") or {}
    differ = {k: (v, model_config[k]) for k, v in stored.items() if k in model_config and model_config[k] != v}
    if not differ:
        return
    listed = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in sorted(differ.items()))
    data = ("latents cache" if cfg.data.kind == "latents" else "data") + (
        f" data.root={cfg.data.root}" if getattr(cfg.data, "root", None) else "")
    raise ConfigError(
        f"checkpoint {state.get('source', '')} does not fit the model this run builds from its config and {data} "
        f"({listed}): use the data (or latents cache) and model it was trained with, or start without it "
        "(a new run directory, no resume=)"
    )


def check_same_data(state: dict, identity: Optional[dict], cfg: TrainConfig) -> None:
    """ConfigError, before any training, if this run directory's checkpoint was trained on other
    data than `identity` (`dit.train.stream.data_identity`) describes, unless data.allow_changed.
    A checkpoint from elsewhere (resume=, fine-tuning) or one without the record: a warning."""
    stored = state.get("data_identity")
    where = f"data.root={cfg.data.root}" if getattr(cfg.data, "root", None) else f"data={cfg.data.kind}"
    if identity is None:
        return
    if stored is None:
        log.warning("checkpoint %s records no fingerprint of its data (an older checkpoint): cannot check that "
                    "%s is the data it was trained on", state.get("source"), where)
        return
    if stored == identity:
        return
    if stored.get("classes") != identity["classes"]:
        differ = "its class names or their order differ, so labels would change meaning"
    elif stored.get("items") != identity["items"]:
        differ = f"it has {identity['items']} items, the checkpoint's data had {stored.get('items')}"
    else:
        differ = "the same classes and number of items, but other files (names or sizes)"
    message = (f"{where} is not the data set checkpoint {state.get('source')} was trained on ({differ})")
    if cfg.data.allow_changed or not state.get("own", True):
        log.warning("%s; continuing on it%s", message, "" if cfg.data.allow_changed else " (resume= from elsewhere)")
        return
    raise ConfigError(f"{message}: resume with the data set it was trained on, or set data.allow_changed=true "
                      "to continue on this one on purpose")


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where a run's checkpoints go and which of them are kept (`prune_checkpoints`), and the
    fault-injection hooks of their writes: the same for every save of a run."""

    ckpt_dir: Path
    keep_last: Optional[int]
    keep_every: Optional[int] = None
    faults: Faults = NO_FAULTS


def save_checkpoint(env: DistEnv, policy: CheckpointPolicy, step: int, model: nn.Module, ema_module: nn.Module,
                    opt, meta: dict, previous: Optional[Path] = None) -> Path:
    """Write our checkpoint of step `step` (contract 2 in docs/design.md) into `policy.ckpt_dir`:
    the weights and the optimizer state gathered from every rank (collectives under FSDP), each
    rank's RNG states, and `meta` (configs, data position, format version, ...) from rank 0, which
    writes the file. Old checkpoints are pruned only once the new one is complete. A failed write
    (full disk) raises CheckpointWriteError on every rank, naming `previous`, which is kept. A
    checkpoint with a NaN/inf tensor in its weights, EMA or optimizer state is not written:
    NonFiniteTrainingError on every rank, nothing pruned."""
    ckpt = {
        "model": full_model_state(model),
        "ema": full_model_state(ema_module),
        "opt": full_optimizer_state(model, opt),
        "rng": {"ranks": gather_objects(rng_state(env.device), env)},
    }
    path = checkpoint_path(policy.ckpt_dir, step)
    error = None
    kept = f"the newest complete checkpoint, {previous}, is kept" if previous else "no earlier checkpoint exists"
    if env.is_main:
        ckpt.update(step=step, **meta)
        bad = nonfinite_entries({k: ckpt[k] for k in ("model", "ema", "opt")})
        if bad:  # never on disk, and never a reason to prune the last good checkpoint
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            error = NonFiniteTrainingError(
                f"checkpoint at step {step} refused: {shown} hold NaN/inf values; nothing was written and no "
                f"checkpoint was deleted ({kept}, and a relaunch resumes from it). An update made the weights "
                "non-finite: raise optim.eps (0 divides by zero), lower optim.lr, set optim.grad_clip, or use "
                "precision=fp32"
            )
        else:
            ckpt = with_checksum(ckpt)  # verified on every load: a flipped bit is found, not resumed
            policy.faults.checkpoint_write(step, ckpt, path)
            try:
                save_atomic(ckpt, path)
            except CheckpointWriteError as err:
                error = err
            else:
                for old in prune_checkpoints(policy.ckpt_dir, policy.keep_last, policy.keep_every):
                    log.info("deleted old checkpoint %s", old)
                log.info("saved checkpoint %s", path)
    # Every rank raises rank 0's error (this is also the barrier).
    failed = broadcast_object(None if error is None else (type(error).__name__, str(error)), env)
    if isinstance(error, NonFiniteTrainingError):
        raise error
    if failed is not None and failed[0] == NonFiniteTrainingError.__name__:
        raise NonFiniteTrainingError(failed[1])
    if failed is not None:
        raise CheckpointWriteError(f"checkpoint at step {step} failed: {failed[1]}; {kept}",
                                   errno=getattr(error, "errno", None)) from error
    return path
