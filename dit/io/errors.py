"""The errors of checkpoint files that cannot be read or written.

Callers import them from `dit.io.checkpoint`, which re-exports them. They are defined here, below
it, because dit/io/release.py raises them too and `dit.io.checkpoint` imports release.py: defined
in checkpoint.py they would close an import circle.
"""

from __future__ import annotations


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
