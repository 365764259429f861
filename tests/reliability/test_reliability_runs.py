"""Reliability of training runs under attack (issue 15): two launches into one run directory, a
code-running pickle planted among the checkpoints, updates that make the weights non-finite,
preemption signals during start-up, a different data set on resume. What each case guarantees:
docs/reliability.md. Real processes where the exit status matters (`train.py` as a subprocess);
the tiny run of conftest.TOY_RUN.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from dit.train import run_training
from dit.train.faults import NonFiniteTrainingError
from dit.train.resume import checkpoint_path

from conftest import (TOY_RUN as BASE, TOY_RUN_STEPS as STEPS, assert_same_training_state, final_state,
                      start_script, toy_run_config as config)
from test_reliability import (  # noqa: F401 - `reference` is a fixture
    checkpoint_steps, logged_steps, reference, temp_files, wait_until,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def train_py(run: Path, *overrides: str, cwd: Path) -> subprocess.Popen:
    """`python train.py <tiny run> <overrides> hydra.run.dir=<run>`, output captured."""
    return start_script("train.py", [*BASE, *overrides, f"hydra.run.dir={run}"], cwd=cwd,
                        env={"OMP_NUM_THREADS": "1"})


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


# --------------------------------------------------------------------------------------
# 3. A code-running pickle planted in a run directory
# --------------------------------------------------------------------------------------


class _Shell:
    """What an attacker pickles: unpickling it calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.slow
def test_a_planted_os_system_pickle_is_refused_as_unsafe_not_skipped_as_corrupt(tmp_path):
    run = tmp_path / "run"
    run_training(config("max_steps=2", "ckpt.every=1", "ckpt.keep_last=null"), run)
    good = torch.load(checkpoint_path(run / "checkpoints", 2), weights_only=True)
    marker = tmp_path / "pwned"
    planted = checkpoint_path(run / "checkpoints", 9)
    torch.save({**good, "step": 9, "rng": _Shell(f"touch {marker}")}, planted)  # the newest checkpoint

    proc = train_py(run, "max_steps=12", "ckpt.every=1", "ckpt.keep_last=null", cwd=tmp_path)
    output = finish(proc)
    assert proc.returncode == 1, output[-3000:]
    assert not marker.exists()  # the code did not run ...
    assert planted.is_file() and not list((run / "checkpoints").glob("*.corrupt"))  # ... nor was it set aside
    assert checkpoint_steps(run) == [1, 2, 9] and logged_steps(run) == [1, 2]  # nothing trained past it
    errors = [ln for ln in output.splitlines() if "UnsafeCheckpointError:" in ln]
    assert errors, output[-3000:]
    line = errors[-1]
    assert "0000009.pt" in line and "arbitrary Python objects and is refused" in line and "system" in line, line
    assert "weights_only" not in line and "False" not in line  # torch's advice to load it unsafely is not passed on

    torch.load(planted, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


# --------------------------------------------------------------------------------------
# 6. An update that makes the weights non-finite (finite loss and gradient)
# --------------------------------------------------------------------------------------


def assert_all_finite(run: Path) -> None:
    for step in checkpoint_steps(run):
        ckpt = torch.load(checkpoint_path(run / "checkpoints", step), weights_only=True)
        tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
                   *(v for s in ckpt["opt"]["state"].values() for v in s.values())]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), step


def test_no_checkpoint_holds_a_nonfinite_tensor_and_the_last_finite_one_is_never_pruned(tmp_path):
    # A NaN weight after the update of step 4, the checkpoint due at that step, keep_last=1: the
    # save is refused, nothing is pruned.
    run = tmp_path / "every_step"
    common = ["max_steps=10", "ckpt.every=1", "ckpt.keep_last=1", "fault.max_nonfinite_steps=3"]
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_training(config(*common, "debug.nan_weights_at_steps=[4]"), run)
    message = str(stopped.value)
    assert "checkpoint at step 4 refused" in message and "nothing was written" in message, message
    assert f"{checkpoint_path(run / 'checkpoints', 3)}, is kept" in message and "\n" not in message
    assert checkpoint_steps(run) == [3]
    assert_all_finite(run)

    # No checkpoint due: the next step's loss is NaN, the guard finds the weights broken and stops
    # at once (skipping steps cannot mend weights), before the checkpoint of step 6.
    run = tmp_path / "every_3"
    common = ["max_steps=10", "ckpt.every=3", "ckpt.keep_last=1", "fault.max_nonfinite_steps=3"]
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_training(config(*common, "debug.nan_weights_at_steps=[4]"), run)
    message = str(stopped.value)
    assert "stopped at step 5: the weights are NaN/inf" in message, message
    assert f"newest checkpoint, {checkpoint_path(run / 'checkpoints', 3)}, is finite" in message
    assert checkpoint_steps(run) == [3]
    assert_all_finite(run)
    assert run_training(config(*common), run)["step"] == 10  # the fault gone: resumes from step 3

    # The attack as found: optim.eps=0 (AdamW divides 0 by 0 where a gradient is exactly zero, as
    # adaLN-Zero's are at step 1), finite loss and gradient; the guard on or off.
    for guard in ("3", "null"):
        run = tmp_path / f"eps0_{guard}"
        with pytest.raises(NonFiniteTrainingError, match="optim.eps"):
            run_training(config("max_steps=10", "ckpt.every=1", "ckpt.keep_last=1", "optim.eps=0",
                                f"fault.max_nonfinite_steps={guard}"), run)
        assert checkpoint_steps(run) == []


# --------------------------------------------------------------------------------------
# 8. Preemption during start-up
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_during_start_up_exits_75_at_once_writing_nothing(tmp_path, signum):
    """SLURM's SIGUSR1 or SIGTERM while the data set is being built (a toy set of 200 000 images
    takes seconds, as indexing ImageNet or loading a VAE does at scale): status 75, the requeue
    recipe's signal, at once; no checkpoint, no metrics."""
    run = tmp_path / "run"
    proc = train_py(run, "data.num_per_class=20000", "max_steps=5", cwd=tmp_path)
    try:
        # The lock file names this process once its start-up has begun (the watch is on by then).
        assert wait_until(lambda: f"pid {proc.pid} " in _read(run / ".lock") or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signum)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 75, (proc.returncode, output[-3000:])
    assert took < 5, took  # at once, not after the start-up
    assert f"preempted ({signal.Signals(signum).name}) during start-up, before the first step" in output
    assert checkpoint_steps(run) == [] and logged_steps(run) == []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------
# 4. Resuming on another data set
# --------------------------------------------------------------------------------------


def test_resuming_on_a_different_data_set_is_refused_unless_allowed(tmp_path, caplog):
    import logging
    import shutil

    from dit.config import ConfigError
    from dit.data.toy import write_toy_imagefolder

    data = write_toy_imagefolder(tmp_path / "data", num_per_class=1, image_size=16, seed=0)  # 10 classes
    same_size = write_toy_imagefolder(tmp_path / "same_size", num_per_class=1, image_size=16, seed=1)
    permuted = tmp_path / "permuted"  # the same folders, two class names swapped
    shutil.copytree(data, permuted)
    a, b = sorted(p.name for p in permuted.iterdir())[:2]
    (permuted / a).rename(permuted / "swap")
    (permuted / b).rename(permuted / a)
    (permuted / "swap").rename(permuted / b)

    run = tmp_path / "run"
    common = ["data=imagefolder", "global_batch_size=10", "ckpt.every=1"]
    run_training(config(*common, f"data.root={data}", "max_steps=2"), run)
    for other, why in ((same_size, "other files"), (permuted, "other files")):
        with pytest.raises(ConfigError, match=f"is not the data set checkpoint .* was trained on .*{why}.*"
                                              "data.allow_changed=true") as refused:
            run_training(config(*common, f"data.root={other}", "max_steps=3"), run)
        assert "\n" not in str(refused.value)
        assert checkpoint_steps(run) == [1, 2]  # nothing trained on it
    extra = tmp_path / "more"
    shutil.copytree(data, extra)
    shutil.copy(next((extra / a).iterdir()), extra / a / "copy.png")
    with pytest.raises(ConfigError, match="it has 11 items, the checkpoint's data had 10"):
        run_training(config(*common, f"data.root={extra}", "max_steps=3"), run)

    with caplog.at_level(logging.WARNING, logger="dit.train"):  # on purpose
        assert run_training(config(*common, f"data.root={permuted}", "data.allow_changed=true", "max_steps=3"),
                            run)["step"] == 3
    assert any("is not the data set" in r.getMessage() for r in caplog.records)
    # The same data moved elsewhere is the same data.
    moved = tmp_path / "moved"
    shutil.copytree(permuted, moved)
    assert run_training(config(*common, f"data.root={moved}", "max_steps=4"), run)["step"] == 4

    # A checkpoint written before the record existed resumes, with a warning.
    last = checkpoint_path(run / "checkpoints", 4)
    state = torch.load(last, weights_only=True)
    del state["data_identity"], state["checksum"]  # (checksums came later still)
    torch.save(state, last)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit.train"):
        assert run_training(config(*common, f"data.root={same_size}", "max_steps=5"), run)["step"] == 5
    assert any("records no fingerprint of its data" in r.getMessage() for r in caplog.records)
