"""The second reliability attack (issue 21) on how `train.py` ends and starts: an error inside a
DataLoader worker (item 6), a FIFO among the images (item 8), a preemption signal in the first
seconds (item 13). Each test reproduces the attack on the tiny run of conftest.TINY_MODEL in a
real `train.py` process (the exit status and the hang are what is at stake), with a timeout, so
that a hang fails the test instead of stopping the suite. What each case guarantees:
docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL

# An ImageFolder of 16x16 toy images (40: 4 per class), 8 a step: 5 steps per epoch.
IMAGE_RUN = [*TINY_MODEL, "data=imagefolder", "data.image_size=16", "global_batch_size=8", "log.every=1",
             "log.samples.every=0", "ckpt.every_minutes=null"]


def toy_folder(root: Path) -> Path:
    from dit.data.toy import write_toy_imagefolder

    return write_toy_imagefolder(root, num_per_class=4, image_size=16)


def train_py(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py <IMAGE_RUN> <overrides>` into tmp_path/run, stdout and stderr in one pipe."""
    command = [sys.executable, str(REPO / "train.py"), *IMAGE_RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """(output, seconds) of `proc` once it exits; kills it and fails when it runs past `timeout`."""
    began = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"train.py was still running after {timeout:.0f} s:\n{output[-3000:]}")
    return output, time.monotonic() - began


# --------------------------------------------------------------------------------------
# 6. An error inside a DataLoader worker
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_truncated_image_read_by_a_loader_worker_ends_train_py_with_one_line_naming_it(tmp_path):
    """The commonest real fault: a truncated PNG, read in a DataLoader worker (which ignores the
    preemption signals). The error line used to print and the process to live forever (the
    workers, held by the exception's traceback, were sent SIGTERM at exit and waited for). Now
    the workers are stopped: status 1 within 60 s, one line naming the file and the fix."""
    data = toy_folder(tmp_path / "data")
    bad = sorted(data.rglob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:60])  # the header and half a chunk
    proc = train_py(tmp_path, f"data.root={data}", "data.num_workers=2", "max_steps=10")
    output, took = finished(proc, timeout=120)
    assert proc.returncode == 1, output[-3000:]
    assert took < 60, took  # start-up included
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0] and "skip_bad" in errors[0], output[-3000:]
    assert "Traceback" not in output and "DataLoader worker" not in errors[0], output[-3000:]


# --------------------------------------------------------------------------------------
# 8. A FIFO named like an image
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fifos_named_like_images_are_never_indexed_so_never_opened(tmp_path):
    """A FIFO `*.png` in a class folder: first in its class, `data_identity`'s read at start-up
    blocked forever; further on, the DataLoader worker that drew it did, at a later step. Only
    regular files are indexed (a link to a FIFO is followed and refused too), each skipped entry
    named in a warning; the scoring side's folders (`image_files`) list regular files only."""
    import warnings

    from dit.data.images import ImageFolderDataset
    from dit.io.images import image_files

    data = toy_folder(tmp_path / "data")
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    first = classes[0] / "000.png"  # sorts before 000000.png: the file data_identity reads
    later = classes[3] / "zzz.png"  # sorts last: read by a worker in the epoch
    outside = tmp_path / "pipe"
    linked = classes[5] / "link.png"
    for fifo in (first, later, outside):
        os.mkfifo(fifo)
    linked.symlink_to(outside)
    planted = [first, later, linked]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(data, 16)
    assert len(ds) == 40 and not {str(p) for p in planted} & {path for path, _ in ds.samples}
    for p in planted:
        assert any(str(p) in str(w.message) and "not a regular file" in str(w.message) for w in caught), p
    assert not set(planted) & set(image_files(data))

    proc = train_py(tmp_path, f"data.root={data}", "data.num_workers=1", "max_steps=6")  # every item, and one more
    output, _ = finished(proc, timeout=120)
    assert proc.returncode == 0, output[-3000:]
    for p in planted:
        assert f"not indexing {p}" in output, (p, output[-3000:])


# --------------------------------------------------------------------------------------
# 13. A preemption signal in the first seconds
# --------------------------------------------------------------------------------------

# What pip writes as the `dit-train` console script (pyproject.toml's [project.scripts]).
CONSOLE_SCRIPT = """import sys
from dit.cli.train import run
if __name__ == "__main__":
    sys.exit(run())
"""


def _signal_mask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith(f"{field}:"))


def _torch_is_loading(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal masks in /proc")
@pytest.mark.parametrize("signum,program,moment", [
    (signal.SIGTERM, "train.py", "first"), (signal.SIGUSR1, "train.py", "torch"),
    (signal.SIGUSR1, "dit-train", "first"), (signal.SIGTERM, "dit-train", "torch"),
])
def test_a_preemption_signal_before_torch_is_imported_exits_75(tmp_path, signum, program, moment):
    """SLURM's SIGUSR1 or a SIGTERM in the first seconds of `train.py` (or the `dit-train`
    console script), before or while torch is imported: status 75, the requeue status, at once,
    writing nothing. The handlers used to be installed only after the heavy imports, and such a
    signal ended the process with 143 or 138. The signal is sent at `moment`: "first", as soon as
    the process catches it or torch's libraries are mapped into it, whichever comes first;
    "torch", as soon as those libraries are mapped (in the middle of the imports, where an
    exception raised by a handler can be swallowed by the module being imported)."""
    run = tmp_path / "run"
    args = [*TINY_MODEL, "data=toy", "data.image_size=16", "max_steps=5", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if program == "train.py":
        command = [sys.executable, str(REPO / "train.py"), *args]
    else:
        script = tmp_path / "bin" / "dit-train"
        script.parent.mkdir()
        script.write_text(CONSOLE_SCRIPT)
        command = [sys.executable, str(script), *args]
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    bit = 1 << (signum - 1)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _torch_is_loading(proc.pid) or (moment == "first" and _signal_mask(proc.pid, "SigCgt") & bit):
                    break
            except (FileNotFoundError, ProcessLookupError, StopIteration):  # not there yet, or gone
                pass
            time.sleep(0.002)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signum)
        output, took = finished(proc, timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, (proc.returncode, output[-3000:])
    assert took < 10, took  # at once
    assert f"preempted ({signum.name}) during start-up, before the first step: nothing written" in output
    assert not run.exists()  # nothing written


def test_the_watch_takes_the_signals_over_from_the_start_up_guard():
    """Once the config is read, run_training's PreemptionWatch replaces the start-up guard: it
    hands over to, and restores on exit, the handlers from before the guard (a launcher's:
    submitit's requeue on SIGUSR2), never the guard; a guarded signal the config does not list
    gets its own handler back at once."""
    from dit import preemption
    from dit.train.faults import PreemptionWatch

    def launcher(signum, frame):
        pass

    guarded = [getattr(signal, name) for name in preemption.START_UP_SIGNALS]
    saved = {s: signal.getsignal(s) for s in guarded}
    try:
        signal.signal(signal.SIGUSR2, launcher)
        preemption.guard_start_up()
        assert all(signal.getsignal(s) is preemption._preempted for s in guarded)
        with PreemptionWatch((signal.SIGUSR2, signal.SIGTERM)) as watch:
            assert watch.previous == {signal.SIGUSR2: launcher, signal.SIGTERM: saved[signal.SIGTERM]}
            assert signal.getsignal(signal.SIGUSR1) == saved[signal.SIGUSR1]  # not the config's: given back
        assert signal.getsignal(signal.SIGUSR2) is launcher
        assert signal.getsignal(signal.SIGTERM) == saved[signal.SIGTERM]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_start_up_preemption_that_library_code_turns_into_another_error_still_exits_as_preempted():
    """The start-up signal raises TrainingPreempted wherever the process is. Inside a library
    (omegaconf building the config) it can come out as another error, e.g. a half-built config
    failing in a cleanup (seen once in CI: status 1, not 75). The watch still ends the run as
    preempted; an error with no signal behind it is left alone; a library that swallows the exit
    entirely leaves the signal recorded (the loop acts on it at its first step boundary)."""
    from dit.train.faults import PreemptionWatch, TrainingPreempted

    def signal_inside_a_library(replace: bool) -> None:
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs here, on the main thread, and raises
        except BaseException:  # noqa: BLE001 - what such a library does
            if replace:
                raise AttributeError("half-built config") from None

    saved = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(TrainingPreempted) as raised:
            with PreemptionWatch((signal.SIGUSR1,), exit_code=75):
                signal_inside_a_library(replace=True)
        assert raised.value.code == 75 and isinstance(raised.value.__cause__, AttributeError)
        with PreemptionWatch((signal.SIGUSR1,), exit_code=75) as watch:
            signal_inside_a_library(replace=False)
        assert watch.received == signal.SIGUSR1 and not watch.starting
        with pytest.raises(ValueError):  # no signal: the error is the run's own
            with PreemptionWatch((signal.SIGUSR1,), exit_code=75):
                raise ValueError("a real failure")
    finally:
        signal.signal(signal.SIGUSR1, saved)
