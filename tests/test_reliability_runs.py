"""Reliability of training runs under attack (issue 15): two launches into one run directory, a
code-running pickle planted among the checkpoints, updates that make the weights non-finite,
preemption signals during start-up, a different data set on resume. What each case guarantees:
docs/reliability.md. Real processes where the exit status matters (`train.py` as a subprocess);
the tiny run of tests/test_reliability.py.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dit.train import run_training
from dit.train.resume import checkpoint_path

from test_reliability import (  # noqa: F401 - `reference` is a fixture
    BASE, STEPS, assert_same_training_state, checkpoint_steps, config, final_state, logged_steps, reference,
    temp_files, wait_until,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def train_py(run: Path, *overrides: str, cwd: Path) -> subprocess.Popen:
    """`python train.py <tiny run> <overrides> hydra.run.dir=<run>`, output captured."""
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *BASE, *overrides, f"hydra.run.dir={run}"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return output


# --------------------------------------------------------------------------------------
# 1. Two runs in one run directory
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_launch_into_a_live_run_directory_is_refused_at_once_and_touches_nothing(tmp_path, reference):
    """A duplicated submission: the second `train.py` exits non-zero within seconds, naming the
    holder (pid, host), before it cleans up, truncates or loads anything; the live run ends
    bitwise equal to a run alone. A lock file left by a killed run blocks nothing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 999999 on host gone, since long ago\n")  # left by a killed run
    live = train_py(run, f"max_steps={STEPS}", "ckpt.every=10", "ckpt.keep_last=null", cwd=tmp_path)
    try:
        assert wait_until(lambda: 12 in logged_steps(run) or live.poll() is not None)
        live.send_signal(signal.SIGSTOP)  # hold the live run mid-way (a checkpoint written, more to come)
        # A checkpoint write in flight (its temp file) and the files the live run owns.
        in_flight = run / "checkpoints" / f".{checkpoint_path(run, 20).name}.{live.pid}.0123abcd.tmp"
        in_flight.write_bytes(b"half a checkpoint")
        owned = {p: p.read_bytes() for p in [run / "metrics.jsonl", *(run / "checkpoints").iterdir()]}

        began = time.monotonic()
        second = train_py(run, f"max_steps={STEPS}", "ckpt.every=10", "ckpt.keep_last=null", "optim.lr=1e-3",
                          cwd=tmp_path)
        output = finish(second, timeout=60)
        took = time.monotonic() - began
        assert second.returncode not in (0, None), output[-3000:]
        assert took < 30, took  # python and torch start-up; no waiting for the lock
        (line,) = [ln for ln in output.splitlines() if "is in use by another training run" in ln]
        assert f"pid {live.pid} on host {socket.gethostname()}" in line and "name=" in line, line
        assert {p: p.read_bytes() for p in owned if p.exists()} == owned  # nothing removed or changed
        assert sorted(owned) == sorted([run / "metrics.jsonl", *(run / "checkpoints").iterdir()])
    finally:
        live.send_signal(signal.SIGCONT)
    output = finish(live)
    assert live.returncode == 0, output[-3000:]
    in_flight.unlink()
    assert temp_files(run) == []
    assert_same_training_state(final_state(run), reference)
    assert logged_steps(run) == list(range(1, STEPS + 1))

    # The run is over: its lock went with it, and the directory takes the next launch.
    result = run_training(config(f"max_steps={STEPS + 2}", "ckpt.every=10", "ckpt.keep_last=null"), run)
    assert result["step"] == STEPS + 2
