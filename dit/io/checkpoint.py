"""Checkpoint files: safe writes and reads, and loading DiT weights from ours or the release.

Two file formats hold DiT weights:

* the official release (`DiT-XL-2-256x256.pt`, ...): a plain EMA state dict in the official
  layout, nothing else; the configuration is inferred from the tensor shapes (dit/io/release.py);
* ours (contract 2 in docs/design.md): a dict with `model`, `ema` (both official layout), `opt`,
  `step`, `model_name`, `model_config`, `autoencoder`, `config`, ... written by `save_atomic`.

Either may also be a `.safetensors` file (weights only; `save_weights_safetensors` stores
`model_name` / `model_config` in its string metadata).

Reading never unpickles arbitrary objects: `torch.load(..., weights_only=True)` or safetensors.
Writing goes through `dit.io.atomic.write_atomic` (temp file, fsync, rename), so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dit.io.atomic import RecordingFile, write_atomic
from dit.io.errors import CheckpointError, CheckpointMismatchError, CheckpointWriteError, UnsafeCheckpointError
from dit.models import DiT, DiTConfig, arch_name, canonical_model_name, model_arch
from dit.io.release import describe_state_dict, infer_dit_config, strip_wrapper_prefixes

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "save_atomic",
    "with_checksum",
    "payload_digest",
    "save_weights_safetensors",
    "load_state",
    "read_safetensors_metadata",
    "load_dit_checkpoint",
]

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DiTConfig))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


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
            recorder = RecordingFile(f)
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
# torch 2.6+ says "Unsupported global: GLOBAL os.system was not an allowed global" after a
# "WeightsUnpickler error:" prefix; torch 2.14 says "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked" with no prefix (for modules it blocks outright).
_UNSAFE_MARKERS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build", "is blocked")
# torch's own boilerplate around the reason: its advice to load with weights_only=False (which
# would run the payload) is never repeated to the user.
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Re-running", "In PyTorch")


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only error that says why it stopped (a blocked global, a
    bad opcode), without torch's advice to retry unsafely."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    reasons = [ln.split("WeightsUnpickler error:", 1)[-1].strip() for ln in lines
               if "WeightsUnpickler error:" in ln or not ln.startswith(_TORCH_ADVICE)]
    flagged = [r for r in reasons if any(marker in r for marker in _UNSAFE_MARKERS)]
    reason = (flagged or reasons or ["no reason given"])[0]
    return reason.split(" Please use")[0].strip()


# --------------------------------------------------------------------------------------
# Checksums: a bit flipped after the write (bit rot, a bad copy) usually still unpickles, and
# torch does not check the zip records' CRCs. Our checkpoints carry a SHA-256 of their content.
# --------------------------------------------------------------------------------------

CHECKSUM_KEY = "checksum"
_CHECKSUM_SCHEME = "sha256-content-v1"


def _digest_into(h, obj: Any) -> None:
    """Feed `obj` to hash `h` in a canonical order: tensors by dtype, shape and raw bytes; mappings
    by sorted key; sequences in order; anything else by its type and repr. Independent of the
    zip layout, so it checks what was loaded, not how torch laid it out."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)};".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _digest_into(h, key)
            _digest_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):  # a tuple may come back as a list: the same content
        h.update(f"S{len(obj)};".encode())
        for item in obj:
            _digest_into(h, item)
    else:
        text = f"{type(obj).__name__}:{obj!r}"
        h.update(f"V{len(text)};{text}".encode())


def payload_digest(obj: Mapping) -> str:
    """SHA-256 (hex) of everything in the checkpoint dict `obj` except its checksum entry."""
    h = hashlib.sha256()
    _digest_into(h, {k: v for k, v in obj.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def with_checksum(obj: Mapping) -> dict:
    """`obj` with a checksum entry that `load_state` verifies on every read. One pass over the
    tensors (about the cost of copying them once)."""
    return {**obj, CHECKSUM_KEY: {"scheme": _CHECKSUM_SCHEME, "sha256": payload_digest(obj)}}


def _verify_checksum(obj: Any, path: Path) -> None:
    stored = obj.get(CHECKSUM_KEY) if isinstance(obj, Mapping) else None
    if not (isinstance(stored, Mapping) and stored.get("scheme") == _CHECKSUM_SCHEME):
        return  # a release file, a weights-only file, or one of ours from before checksums
    if payload_digest(obj) != stored.get("sha256"):
        raise CheckpointError(
            f"{str(path)!r} fails its SHA-256 check: its content changed after it was written (bit rot, a "
            "bad copy or an edit), so it is treated as corrupt. Use an earlier checkpoint or a good copy"
        )


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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_reason(str(e))
        if any(marker in detail for marker in _UNSAFE_MARKERS):
            raise UnsafeCheckpointError(
                f"{str(path)!r} contains arbitrary Python objects and is refused: unpickling it could run "
                f"code ({detail[:300]}). Only tensors, containers and plain values are accepted. If you "
                "trust the file, re-save its tensors as a plain dict (or safetensors) in a separate, "
                "trusted process."
            ) from None
        reason = f" ({detail[:200]})" if detail.strip() else ""
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint that can be read safely{reason}; it may be truncated or "
            "a different kind of file: give a checkpoint written by train.py or torch.save (a state dict)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "it may be truncated or a different kind of file"
        ) from e
    _verify_checksum(obj, path)
    return obj


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
    lines.append(f"  the file looks like {describe_state_dict(sd)}")
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
