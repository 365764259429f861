"""One training run per run directory: rank 0 holds `<run_dir>/.lock` (a POSIX lock the kernel
drops when the process dies) for the whole run, so a duplicated launch into a live run directory
is refused before it reads, removes or truncates anything there (docs/reliability.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from dit.distributed import DistEnv, broadcast_object

LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another training process holds the run directory's lock."""


def _lock(path: Path) -> int:
    """An open descriptor of `path` holding an exclusive POSIX lock (fcntl.lockf), with this
    process's pid and host written in it. A POSIX lock belongs to this process alone (the
    DataLoader workers forked from it do not hold it) and the kernel drops it when the process
    dies, however it dies: a lock file left by a killed run blocks nothing. The holder deletes
    the file when it is done (`run_directory_lock`); a lock taken on a file deleted meanwhile is
    dropped and taken again on the new file, so two processes never both hold the directory."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirectoryBusy(f"cannot open the run directory's lock file {path} ({err.strerror or err}): fix "
                                   "the permissions of the run directory, or choose another with name=...") from err
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(fd)  # our descriptor only: the holder's lock is its own
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise RunDirectoryBusy(f"cannot lock {path} ({err.strerror or err}): the file system of the run "
                                       "directory may not support locks; choose another run directory") from err
            raise RunDirectoryBusy(
                f"the run directory {path.parent} is in use by another training run ({holder}): nothing was "
                "changed there. Wait for that run to end (or stop it), or start this one elsewhere with "
                "name=<new name> (or hydra.run.dir=...)"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder deleted the file after we opened it: lock the new one
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode(), 0)
    return fd


@contextmanager
def run_directory_lock(run_dir: Path, env: DistEnv):
    """Hold `<run_dir>/.lock` for the block: a second run launched into the same directory (a
    duplicated job) raises RunDirectoryBusy on every rank, naming the holder's pid and host,
    before it reads, removes or truncates anything there. Rank 0 holds the lock."""
    fd, error = None, None
    if env.is_main:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fd = _lock(Path(run_dir) / LOCK_FILE)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    try:
        failed = broadcast_object(None if error is None else str(error), env)
        if error is not None:
            raise error
        if failed is not None:
            raise RunDirectoryBusy(f"rank 0 could not lock the run directory ({failed})")
        yield
    finally:
        if fd is not None:
            # Delete the file while holding the lock (the run directory is left as the run's own
            # files), then release it.
            Path(run_dir, LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
