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
import io
import json
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
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
    "list_checkpoints",
    "run_checkpoints",
    "newest_intact_checkpoint",
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


# How torch's weights-only loader fails, sorted into the two outcomes that matter to a caller: a
# corrupt file (cut short, damaged, no checkpoint at all: set it aside, use another one) and a
# hostile one (a pickle that asks for more than tensors and containers: stop, never skip it).
#
# Corrupt: whatever is not a refusal of the weights-only unpickler. A zip archive that does not
# open or lacks a record (RuntimeError, KeyError), a stream that ends early (EOFError, and
# struct.error / "unexpected EOF" in the legacy format), a damaged pickle that the safe unpickler
# reads wrongly without being asked for anything it refuses (IndexError on an empty stack,
# TypeError / AttributeError / ValueError / AssertionError on misplaced values): none of these can
# run code, and a damaged checkpoint ends in one of them.
_DAMAGED_FILE_ERRORS = (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
                        AssertionError, struct.error)
# Hostile: every refusal (pickle.UnpicklingError), whatever its words: a global it will not import,
# a call or object it will not make, and also an opcode it does not implement. The last is how a
# payload written with the protocol-0 INST opcode or with protocol 4 is refused ("Unsupported
# operand 83" / "140"), before torch ever reads the global it would call, so the wording cannot
# tell a payload from damage. One exception (`_is_no_pickle_at_all`): a stream refused at its very
# first byte that names no global anywhere is no pickle (a text file, zeros), i.e. corrupt.
_REFUSED_OPCODE = re.compile(r"Unsupported operand (\d+)")
# torch's own boilerplate around the reason: its advice to load with weights_only=False (which
# would run the payload) is never repeated to the user.
_TORCH_ADVICE = ("(1)", "(2)", "Check the documentation", "Re-running", "In PyTorch", "This file can still",
                 "Please file an issue", "Do it only")


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only error that says why it stopped (a blocked global, a
    bad opcode), without torch's advice to retry unsafely."""
    reasons = []
    for line in message.splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        line = line.removeprefix("Weights only load failed.").strip()
        if line and not line.startswith(_TORCH_ADVICE):
            reasons.append(line)
    return (reasons or ["no reason given"])[0].split(" Please use")[0].strip()


# The pickle opcodes that push a str (what STACK_GLOBAL takes its module and name from).
_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE8"}
# GLOBAL / INST as bytes: "c" or "i", a module, a newline, a name, a newline.
_TEXT_IMPORT = re.compile(rb"[ci]([A-Za-z_][\w.]*)\n([A-Za-z_][\w.]*)\n")
# How much of a pickle stream is read to look for the globals it names; a longer one is not
# looked through, so it never counts as free of them.
_SCAN_LIMIT = 64 << 20


def _pickle_stream(path: Path) -> bytes | None:
    """The pickle stream torch's loader unpickles from `path`: the `data.pkl` record of a zip
    archive (recognised as torch does, by its first bytes), else the file itself. Up to
    _SCAN_LIMIT + 1 bytes; None if the archive cannot be read here."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                f.seek(0)
                return f.read(_SCAN_LIMIT + 1)
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            with archive.open(name) as record:
                return record.read(_SCAN_LIMIT + 1)
    except (OSError, zipfile.BadZipFile, StopIteration, RuntimeError, ValueError):
        return None


def _globals_named(data: bytes) -> list[str]:
    """`module.name` of each global the pickle stream(s) in `data` would import, found without
    unpickling anything: GLOBAL and INST carry the name; STACK_GLOBAL takes it from the two strings
    pushed before it (one it cannot follow is listed as "a global named on the stack"). Where the
    bytes stop being a pickle that pickletools can read, the rest is searched for names shaped like
    a GLOBAL or INST, because CPython's unpickler accepts a few things pickletools rejects."""
    stream, names = io.BytesIO(data), []
    while stream.tell() < len(data):  # the legacy format is several pickles in a row
        memo, pushed, position = {}, [], stream.tell()
        try:
            for op, arg, position in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", ".", 1))
                elif op.name == "STACK_GLOBAL":
                    known = len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:])
                    names.append(".".join(pushed[-2:]) if known else "a global named on the stack")
                if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name not in ("FRAME", "PROTO"):
                    pushed.append(arg if op.name in _STRING_OPCODES else None)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle that pickletools reads
            names += [f"{m.decode()}.{n.decode()}" for m, n in _TEXT_IMPORT.findall(data, position)]
            break
    return names


def _is_no_pickle_at_all(data: bytes | None, refusal: str) -> bool:
    """Whether torch refused the stream `data` at its first byte ("Unsupported operand <that
    byte>") and nothing in it names a global: a text file, zeros or random bytes, not a payload.
    A stream torch accepted a first opcode of, or one that imports anything, is not."""
    refused = _REFUSED_OPCODE.search(refusal)
    return (data is not None and len(data) <= _SCAN_LIMIT and refused is not None and bool(data)
            and data[0] == int(refused.group(1)) and not _globals_named(data))


def _calls_named(data: bytes | None) -> list[str]:
    """The globals `data` names beyond those torch's weights-only loader allows: what a full
    unpickler would import and call (for the error message only)."""
    if data is None:
        return []
    try:  # a private table of torch; without it every name is shown
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        allowed = set()
    return [name for name in dict.fromkeys(_globals_named(data[:_SCAN_LIMIT])) if name not in allowed]


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


def _checksum_entry_fault(stored: Any) -> str | None:
    """What is wrong with a checksum entry, in words, or None if it is a valid one of ours."""
    if not isinstance(stored, Mapping):
        return f"a {type(stored).__name__}, not a mapping of scheme and digest"
    if stored.get("scheme") != _CHECKSUM_SCHEME:
        return f"scheme {stored.get('scheme')!r}, not {_CHECKSUM_SCHEME!r}"
    digest = stored.get("sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return f"sha256 {digest!r}, not a hex SHA-256 digest"
    return None


def _looks_like_checksum_entry(value: Any) -> bool:
    """A mapping with our digest in it, or our scheme string: a checksum entry even where one of
    its names is damaged."""
    return isinstance(value, Mapping) and ("sha256" in value or str(value.get("scheme", "")).startswith("sha256"))


def _verify_checksum(obj: Any, path: Path) -> None:
    # Only a file that never had a checksum entry goes unchecked: a release file, a weights-only
    # file, or one of ours from before checksums. An entry that is there but not valid (its scheme
    # string changed, its digest gone, or the entry found under a damaged key such as "checksun")
    # is damage like any other, not a reason to skip the check: else one damaged byte in the entry
    # would let a flipped weight bit in the same file through.
    if not isinstance(obj, Mapping):
        return
    if CHECKSUM_KEY in obj:
        fault = _checksum_entry_fault(obj[CHECKSUM_KEY])
    else:
        stray = [key for key, value in obj.items() if _looks_like_checksum_entry(value)]
        if not stray:
            return
        fault = f"found under the key {stray[0]!r} instead of {CHECKSUM_KEY!r}"
    if fault is not None:
        raise CheckpointError(
            f"{str(path)!r} has a damaged checksum entry ({fault[:200]}), so its content cannot be verified and it "
            "is treated as corrupt (or it was written by a newer version of this code, whose checksums this one "
            "does not know). Use an earlier checkpoint or a good copy"
        )
    if payload_digest(obj) != obj[CHECKSUM_KEY]["sha256"]:
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
        reason = _unpickler_reason(str(e))
        data = _pickle_stream(path)
        if _is_no_pickle_at_all(data, reason):
            raise CheckpointError(
                f"{str(path)!r} is not a PyTorch checkpoint that can be read safely ({reason[:200]}); it may be "
                "truncated or a different kind of file: give a checkpoint written by train.py or torch.save "
                "(a state dict)"
            ) from None
        calls = _calls_named(data)
        detail = (f"it would import {', '.join(calls[:3])}; " if calls else "") + (
            f"torch's safe loader refused: {reason}")
        raise UnsafeCheckpointError(
            f"{str(path)!r} contains arbitrary Python objects and is refused: unpickling it could run code "
            f"({detail[:300]}). Only tensors, containers and plain values are accepted, and the file was left as it "
            "is. If you did not put it there, treat it as planted and inspect it without loading it; if you trust "
            "it, re-save its tensors as a plain dict (or safetensors) in a separate, trusted process; if it is a "
            "file of yours damaged on disk, move it away (a run then resumes from its previous checkpoint)."
        ) from None
    except _DAMAGED_FILE_ERRORS as e:
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


# --------------------------------------------------------------------------------------
# The checkpoints of a run directory: `<run>/checkpoints/<step:07d>.pt` (dit/train/resume.py
# writes them). Here, below both, so that resume=, init_from= and sample.py's checkpoint= find
# a run's checkpoints the same way.
# --------------------------------------------------------------------------------------

CHECKPOINT_NAME = re.compile(r"^(\d+)\.pt$")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `ckpt_dir`, oldest first. Temporary files of
    an interrupted write do not match the name pattern."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir) if (m := CHECKPOINT_NAME.match(name))]
    return sorted(found)


def run_checkpoints(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints of a run directory (`<path>/checkpoints/`), or of `path`
    itself when it is a checkpoints folder; oldest first, [] when neither holds one."""
    path = Path(path).expanduser()
    return list_checkpoints(path / "checkpoints") or list_checkpoints(path)


def newest_intact_checkpoint(path: str | os.PathLike, read: Callable[[Path], Any] = load_state,
                             ) -> tuple[Path | None, Any, list[tuple[Path, CheckpointError]]]:
    """The newest checkpoint of the run directory (or checkpoints folder) `path` that `read`
    reads: (its path, what `read` returned, the newer ones skipped, each with its error). A
    CheckpointError from `read` (truncated, damaged, failing its checksum, not a checkpoint) skips
    the file, which is left where it is; UnsafeCheckpointError (it would run code) and
    CheckpointMismatchError (weights that do not fit what was asked for: an older checkpoint of
    the same run would not either) are raised. (None, None, skipped) when none reads; `skipped`
    is empty when there is no checkpoint at all."""
    skipped = []
    for _, candidate in reversed(run_checkpoints(path)):
        try:
            return candidate, read(candidate), skipped
        except (UnsafeCheckpointError, CheckpointMismatchError):
            raise
        except CheckpointError as err:
            skipped.append((candidate, err))
    return None, None, skipped
