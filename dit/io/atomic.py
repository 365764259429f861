"""Atomic file writes, and the JSON and text files written through them.

A write goes to a temp file in the same directory, is fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one. A failed write raises
`FileWriteError`, naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable


class FileWriteError(OSError):
    """A file could not be written (disk full, quota, permissions, I/O error). `errno`, `strerror`
    and `filename` are the OS error's; the message names the file and what to do. Nothing was
    written under that name: a file already there is unchanged."""

    def __init__(self, path: str | os.PathLike, cause: OSError,
                 kept: str = "Nothing was written under that name (a file already there is unchanged)"):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.kept = kept

    def __str__(self) -> str:
        reason = f"{self.strerror} (errno {self.errno})" if self.errno else self.strerror
        return (f"could not write {self.filename}: {reason}. {self.kept}: free space or fix permissions on "
                f"{Path(self.filename).parent}, then rerun")


# How Rust's std::io::Error shows its OS error ("No space left on device (os error 28)"): the text
# of safetensors' SafetensorError when its writer fails, an exception that is not an OSError.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(err: BaseException) -> OSError | None:
    """The OS error behind a failed write: `err` itself when it is an OSError, an OSError made
    from the error number a library's own exception carries in its text (safetensors' writer on a
    full disk raises `SafetensorError("... No space left on device (os error 28)")`), else None."""
    if isinstance(err, OSError):
        return err
    found = _RUST_OS_ERROR.search(str(err)) if isinstance(err, Exception) else None
    if found is None:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number))


def atomic_target(path: str | os.PathLike) -> Path:
    """Where an atomic write of `path` goes: the file a symlink points to (the link stays a link,
    e.g. a results file kept on a bigger disk), else `path`. Anything there but a regular file (a
    directory, a device, a FIFO) is refused rather than replaced."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists() and not target.is_file():
        kind = "a directory" if target.is_dir() else "not a regular file (a device, FIFO or socket)"
        via = f" (the target of the link {path})" if target != path else ""
        raise FileExistsError(f"refusing to write {target}{via}: it exists and is {kind}; choose another path")
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_path)` for a temp file beside `path`, fsync it, rename it onto `path`.

    The temp file lives in the same directory so that `os.replace` is a rename within one
    filesystem (atomic on POSIX). On any failure the temp file is removed and `path` keeps
    its previous content; an OSError (or a library's error carrying one, `as_os_error`) becomes a
    `FileWriteError` naming `path`. A symlink at `path` is written through (`atomic_target`);
    returns `path` as given.
    """
    given = Path(path)
    path = atomic_target(given)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = as_os_error(err)
        if cause is None or isinstance(err, FileWriteError):
            raise
        raise FileWriteError(given, cause) from err
    # Persist the rename itself (the directory entry); not possible on every OS/filesystem.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return given
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return given


class RecordingFile:
    """A file wrapper that remembers the OSError of a failed write: torch's zip writer replaces it
    by an opaque "unexpected pos" RuntimeError, and the real reason is what the user needs."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def read_json_file(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in `path`; a truncated or corrupt file raises ValueError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it is truncated or corrupt; {fix}") from err


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, CSV, logs) through `write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: dict) -> Path:
    """A settings/record JSON file: indented, keys sorted, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
