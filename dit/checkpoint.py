"""Checkpoint files: safe writes and reads, and loading DiT weights from ours or the release.

Two file formats hold DiT weights:

* the official release (`DiT-XL-2-256x256.pt`, ...): a plain EMA state dict in the official
  layout, nothing else; the configuration has to be inferred from the tensor shapes;
* ours (contract 2 in docs/design.md): a dict with `model`, `ema` (both official layout), `opt`,
  `step`, `model_name`, `model_config`, `autoencoder`, `config`, ... written by `save_atomic`.

Either may also be a `.safetensors` file (weights only; `save_weights_safetensors` stores
`model_name` / `model_config` in its string metadata).

Reading never unpickles arbitrary objects: `torch.load(..., weights_only=True)` or safetensors.
Writing goes through `dit.files.write_atomic` (temp file, fsync, rename), so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dit.files import write_atomic
from dit.models import DIT_SIZES, DiT, DiTConfig, arch_name, canonical_model_name, model_arch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "save_atomic",
    "save_weights_safetensors",
    "load_state",
    "read_safetensors_metadata",
    "strip_wrapper_prefixes",
    "infer_dit_config",
    "load_dit_checkpoint",
]

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DiTConfig))
# The paper's label-dropout rate, assumed for state dicts that carry no config of their own.
RELEASE_CLASS_DROPOUT = 0.1


class CheckpointError(RuntimeError):
    """A file that is not a usable checkpoint (corrupt, wrong kind, missing pieces)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects beyond tensors and containers; it is not loaded."""


class CheckpointMismatchError(CheckpointError):
    """The weights in the file do not fit the requested model (keys or shapes differ)."""


class CheckpointWriteError(CheckpointError):
    """A file could not be written (disk full, quota, permissions, I/O error). Nothing was
    written under its name: a file already there is unchanged. `errno` is the OS error number."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _WriteRecorder:
    """A file wrapper for `torch.save` that remembers the OSError of a failed write: torch's
    zip writer replaces it by an opaque "unexpected pos" RuntimeError, and the real reason
    (e.g. ENOSPC, no space left on device) is what the user needs to hear."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):  # flush, seek, tell, ...: the file's own
        return getattr(self.f, name)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` that never leaves a partial file under `path`.

    Store only tensors, plain containers and Python scalars/strings in `obj` (no numpy arrays,
    no custom classes, no OmegaConf objects), so that `load_state` can read it back with
    `weights_only=True`. A failed write (full disk, ...) raises CheckpointWriteError naming the
    OS error; `path` then keeps its previous content (or stays absent).
    """
    recorder = None

    def write(tmp: Path) -> None:
        nonlocal recorder
        with open(tmp, "xb") as f:
            recorder = _WriteRecorder(f)
            torch.save(obj, recorder)
            f.flush()

    try:
        return write_atomic(path, write)
    except (OSError, RuntimeError) as err:
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if not isinstance(cause, OSError):
            raise
        reason = f"{cause.strerror or cause} (errno {cause.errno})" if cause.errno else str(cause)
        raise CheckpointWriteError(
            f"could not write {path}: {reason}. Nothing was written under that name (a file already there is "
            f"unchanged). Free space or fix permissions on {Path(path).parent}, then relaunch",
            errno=cause.errno,
        ) from cause


def save_weights_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a weights-only `.safetensors` file atomically.

    `metadata` values (e.g. `model_name`, `model_config`) are stored JSON-encoded in the
    file's string header and read back by `read_safetensors_metadata` / `load_dit_checkpoint`.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


# Phrases of torch's weights-only unpickler when a file asks for a global it will not import
# (a class, or a function to call): the signature of pickled Python objects, malicious or not.
_UNSAFE_MARKERS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")


def load_state(path: str | os.PathLike) -> Any:
    """Read a checkpoint file onto the CPU without running any code stored in it.

    `.safetensors` files give a dict of tensors; anything else goes through
    `torch.load(weights_only=True)`. Errors say what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (or is not a file): check the path")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); is it truncated?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler says why it stopped after "WeightsUnpickler error:".
        msg = str(e)
        detail = msg.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].split(" Please use")[0].strip()
        if any(marker in detail for marker in _UNSAFE_MARKERS):
            raise UnsafeCheckpointError(
                f"{str(path)!r} contains arbitrary Python objects and is refused: unpickling it could run "
                f"code ({detail[:300]}). Only tensors, containers and plain values are accepted. If you "
                "trust the file, re-save its tensors as a plain dict (or safetensors) in a separate, "
                "trusted process."
            ) from None
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint that can be read safely ({detail[:200]}); it may be "
            "truncated or a different kind of file"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "it may be truncated or a different kind of file"
        ) from e


def read_safetensors_metadata(path: str | os.PathLike) -> dict:
    """The JSON-decoded metadata written by `save_weights_safetensors` (undecodable values are
    returned as the raw strings; files from elsewhere may have none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key prefixes added by wrappers: DDP's leading `module.` and `torch.compile`'s
    `_orig_mod.` (at the top or on compiled sub-modules)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while len(parts) > 1 and parts[0] == "module":
            parts = parts[1:]
        new = ".".join(parts)
        if new in out:
            raise CheckpointError(f"keys {new!r} appear twice once wrapper prefixes are removed (e.g. {key!r})")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------
# Configuration from shapes
# --------------------------------------------------------------------------------------

_INFER_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "blocks.0.mlp.fc1.weight",
    "final_layer.linear.weight",
)


def infer_dit_config(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    *,
    num_classes: int | None = None,
    class_dropout_prob: float | None = None,
) -> dict:
    """The `DiT` constructor arguments that produce `state_dict`'s keys and shapes.

    Read from the shapes: patch size, input channels and width (patch projection), input size
    (position table length x patch), depth (block count), mlp_ratio (fc1 width / width),
    learned sigma (output channels = 2 x input channels).

    Not in the shapes, so decided by rule:
    * `num_heads`: the official table when (depth, width) is one of S/B/L/XL, otherwise it must
      be passed (it changes the numerics, not the shapes).
    * label table with R rows: either R classes without a null row (no label dropout) or R - 1
      classes plus the null row. Without hints we assume the release convention, a null row
      and dropout 0.1 (1001 rows -> 1000 classes). Pass `num_classes` (R or R - 1 decides) or
      `class_dropout_prob` (0 means no null row) to say otherwise. Files that store a
      `model_config` (ours) never need this: `load_dit_checkpoint` trusts the stored config.
    """
    sd = strip_wrapper_prefixes(state_dict)
    missing = [k for k in _INFER_KEYS if k not in sd]
    if missing:
        sample = ", ".join(list(sd)[:6])
        raise CheckpointError(
            f"cannot infer a DiT configuration: the state dict has no {', '.join(missing)} "
            f"(its keys begin: {sample or 'none'}). Is it a DiT state dict in the official layout?"
        )

    hidden, in_channels, patch, patch_w = sd["x_embedder.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"x_embedder.proj.weight has non-square patches {patch}x{patch_w}")
    num_tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise CheckpointError(f"pos_embed has {num_tokens} tokens, not a square grid")

    block_ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise CheckpointError(f"block indices are not 0..{depth - 1}: {sorted(block_ids)}")

    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:
        raise CheckpointError(f"MLP width {mlp_hidden} is not int(hidden_size * r) for r = {mlp_hidden}/{hidden}")

    out_channels, rem = divmod(sd["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear.weight has {sd['final_layer.linear.weight'].shape[0]} outputs; expected "
            f"patch_size^2 x (1 or 2) x in_channels = {patch * patch} x (1 or 2) x {in_channels}"
        )
    learn_sigma = out_channels == 2 * in_channels

    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is not None:
        if rows not in (num_classes, num_classes + 1):
            raise CheckpointError(
                f"label table has {rows} rows, which fits neither {num_classes} classes nor {num_classes} + null"
            )
        has_null = rows == num_classes + 1
        dropout = class_dropout_prob if class_dropout_prob is not None else (RELEASE_CLASS_DROPOUT if has_null else 0.0)
        if has_null != (dropout > 0):
            raise CheckpointError(
                f"label table has {rows} rows for {num_classes} classes, which contradicts "
                f"class_dropout_prob={dropout} "
                "(a null row exists exactly when class_dropout_prob > 0)"
            )
    elif class_dropout_prob is not None:
        dropout = class_dropout_prob
        num_classes = rows - 1 if dropout > 0 else rows
    else:
        num_classes, dropout = rows - 1, RELEASE_CLASS_DROPOUT

    if num_heads is None:
        num_heads = next((h for d, w, h in DIT_SIZES.values() if (d, w) == (depth, hidden)), None)
        if num_heads is None:
            raise CheckpointError(
                f"cannot infer num_heads: depth={depth}, hidden_size={hidden} is not an official DiT size "
                "and attention heads leave no trace in the shapes. Pass num_heads=... (a divisor of hidden_size)."
            )
    if hidden % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide hidden_size={hidden}")

    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": float(mlp_ratio),
        "class_dropout_prob": float(dropout),
        "num_classes": num_classes,
        "learn_sigma": learn_sigma,
    }


# --------------------------------------------------------------------------------------
# Loading a DiT
# --------------------------------------------------------------------------------------


def _split_file(obj: Any, which: str, path: Path) -> tuple[str, dict, dict]:
    """(format, state dict, stored extras) of a loaded file."""
    if isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("model", "ema")):
        weights = obj.get(which)
        if not isinstance(weights, Mapping):
            other = "model" if which == "ema" else "ema"
            raise CheckpointError(f"{str(path)!r} has no {which!r} weights; it has {other!r}: pass which={other!r}")
        return "ours", dict(weights), dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "official", dict(obj), {}
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{str(path)!r} is not a DiT checkpoint: expected a state dict (official release) or a dict with "
        f"'model'/'ema' state dicts (ours); found {keys}"
    )


def _describe(shapes: dict[str, tuple], keys: list[str], limit: int = 12) -> str:
    items = [f"{k} {tuple(shapes[k])}" for k in keys[:limit]]
    if len(keys) > limit:
        items.append(f"... and {len(keys) - limit} more")
    return "; ".join(items)


def _describe_file(sd: Mapping[str, torch.Tensor]) -> str:
    """What the shapes say about the file's architecture, for error messages."""
    try:
        guess = infer_dit_config(sd)
    except CheckpointError:
        try:
            guess = infer_dit_config(sd, num_heads=1)  # custom width: heads are not in the shapes
            guess.pop("num_heads")
        except CheckpointError as e:
            return f"no DiT this loader knows ({e})"
    name = arch_name(guess["depth"], guess["hidden_size"], guess.get("num_heads", 0), guess["patch_size"])
    return f"{name or 'a custom DiT'}: {guess}"


def _mismatch_report(model: DiT, sd: Mapping[str, torch.Tensor], label: str, path: Path) -> str | None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and expected[k] != found[k]]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f"checkpoint {str(path)!r} does not fit {label}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}), model shapes: {_describe(expected, missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}), file shapes: {_describe(found, unexpected)}")
    if mismatched:
        pairs = [f"{k}: file {found[k]} vs model {expected[k]}" for k in mismatched[:12]]
        if len(mismatched) > 12:
            pairs.append(f"... and {len(mismatched) - 12} more")
        lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(pairs))
    lines.append(f"  the file looks like {_describe_file(sd)}")
    lines.append("Fix: pass the model_name / overrides the file was trained with, or leave them out to infer them.")
    return "\n".join(lines)


def load_dit_checkpoint(
    path: str | os.PathLike,
    which: str = "ema",
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[DiT, dict]:
    """Build a `DiT` from a checkpoint file and load its weights with `strict=True`.

    `path`: an official release file (plain state dict), one of ours, or a `.safetensors` file.
    `which`: "ema" (default) or "model" (the raw training weights) for our files; release files
    hold only EMA weights and ignore it. `model_name` ("DiT-XL/2", "DiT-XL-2", ...) fixes the
    architecture; a file that does not fit it is rejected with the offending keys and shapes.
    `overrides`: `DiTConfig` fields that win over the stored / inferred config (e.g.
    `num_heads` for a custom width, `num_classes`, `class_dropout_prob`).

    The configuration comes from the file's stored `model_config` when there is one, otherwise
    from the tensor shapes (see `infer_dit_config` for the rules). The model is returned in eval
    mode, in float32, on `device`.

    Returns `(model, meta)`, meta = {"format": "official" | "ours", "step", "model_name",
    "model_config", "autoencoder", "config", "file_type": "torch" | "safetensors"}; entries the
    file does not record are None.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown DiT config override(s) {unknown}; valid: {', '.join(CONFIG_FIELDS)}")
    path = Path(path)
    obj = load_state(path)

    if _is_safetensors(path):
        file_type = "safetensors"
        extras = read_safetensors_metadata(path)
        _, sd, _ = _split_file(obj, which, path)
        fmt = "ours" if "model_config" in extras else "official"
    else:
        file_type = "torch"
        fmt, sd, extras = _split_file(obj, which, path)
    sd = strip_wrapper_prefixes(sd)

    # Architecture: the name fixes depth/width/heads/patch; the rest comes from the file.
    arch = model_arch(model_name) if model_name is not None else {}
    stored = extras.get("model_config")
    if isinstance(stored, Mapping):
        base = {k: v for k, v in stored.items() if k in CONFIG_FIELDS}
    else:
        try:
            base = infer_dit_config(
                sd,
                num_heads=overrides.get("num_heads", arch.get("num_heads")),
                num_classes=overrides.get("num_classes"),
                class_dropout_prob=overrides.get("class_dropout_prob"),
            )
        except CheckpointError:
            if not arch:
                raise
            base = {}  # the key/shape report below explains what does not fit
    config = DiTConfig().to_dict() | base | arch | overrides

    with torch.device("meta"):  # shapes only: no memory, no init cost for XL
        model = DiT(**config)
    # The official name of what was built (None for custom sizes); a stored name is not trusted
    # over the shapes, overrides may have changed them.
    name = arch_name(config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"])
    shown = canonical_model_name(model_name) if model_name is not None else name
    label = f"{shown or 'a custom DiT'} ({', '.join(f'{k}={v}' for k, v in config.items())})"
    report = _mismatch_report(model, sd, label, path)
    if report:
        raise CheckpointMismatchError(report)

    # assign=True makes the file's tensors the parameters (keeping requires_grad of each
    # parameter, so pos_embed stays frozen); cast to the model's float32 first.
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device).eval()

    meta = {
        "format": fmt,
        "file_type": file_type,
        "step": extras.get("step"),
        "model_name": name,
        "model_config": model.config.to_dict(),
        "autoencoder": extras.get("autoencoder"),
        "config": extras.get("config"),
    }
    return model, meta
