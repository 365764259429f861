"""Fault injection: kills, corrupt and hostile files, full disks, preemption signals, NaNs, bad
data and bad inputs, dying and hung ranks. Each test asserts that nothing was lost (the run ends
bitwise equal to an uninterrupted one, or the previous checkpoint is intact) and that the error
names the problem. What each case guarantees: docs/reliability.md.

Crashes are real: runs are forked child processes, killed with SIGKILL or signalled like a
scheduler would (forking is much cheaper than a fresh interpreter; `train.py` itself is run as
a subprocess where its exit status matters). Tiny DiT, toy images in pixel space, CPU.
"""

import errno
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from dit.io.checkpoint import CheckpointError, CheckpointWriteError, UnsafeCheckpointError, load_dit_checkpoint
from dit.config import ConfigError
from dit.train import run_training
from dit.train.faults import NonFiniteTrainingError, named_tensors
from dit.train.resume import checkpoint_path, list_checkpoints

from conftest import (TOY_RUN as BASE, TOY_RUN_STEPS as STEPS, FullDisk, assert_same_training_state,
                      bulk_sample_with, compose_config, final_state, joined, single_thread, start_forked as start,
                      start_script, start_training, tiny_dit, toy_run_config as config)

# One intra-op thread here and in the forked children: bitwise comparisons need the same thread
# count everywhere.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps: what every interrupted run must end as, bit for bit."""
    with single_thread():
        result = run_training(config(f"max_steps={STEPS}", "ckpt.every=1000"), tmp_path_factory.mktemp("reference"))
    return torch.load(result["checkpoint"], weights_only=True)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the complete lines of metrics.jsonl (a line being written may be cut short)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir / "checkpoints")]


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


def wait_until(predicate, proc=None, timeout=120.0) -> bool:
    """Poll `predicate` until it holds (True), or `proc` has ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and not proc.is_alive():
            return predicate()
        time.sleep(0.005)
    raise AssertionError("timed out")


# --------------------------------------------------------------------------------------
# Kills
# --------------------------------------------------------------------------------------

KILL_SEED = 7  # the kill points below are drawn from it; any seed must pass


@pytest.mark.slow
def test_kill9_at_random_points_then_relaunch_ends_bitwise_equal(tmp_path, reference):
    """Seven kill -9s at random points (after a step, between backward and update, halfway
    through a checkpoint write, and at random wall-clock moments), each followed by a relaunch
    of the same run; the last relaunch ends bitwise equal to the uninterrupted run.
    keep_last=1: an old checkpoint is deleted only after the new one is complete, so every kill,
    even one inside a checkpoint write, leaves the previous checkpoint."""
    rng = random.Random(KILL_SEED)
    run = tmp_path / "run"
    common = [f"max_steps={STEPS}", "ckpt.every=3", "ckpt.keep_last=1"]
    plan = ["after_step", "random_time", "mid_step", "checkpoint_write", "random_time", "mid_step",
            "checkpoint_write"]
    history = []
    for when in plan:
        done = max(checkpoint_steps(run), default=0)
        if when == "random_time":
            stale = max(logged_steps(run), default=0)  # lines of the last attempt beyond its checkpoint
            proc = start_training(config(*common), run)
            wait_until(lambda: max(logged_steps(run), default=0) > stale, proc)  # it is training
            time.sleep(rng.uniform(0.0, 0.15))  # then anywhere: in a step, a log line, a checkpoint write
            os.kill(proc.pid, signal.SIGKILL)
            step = None
        else:
            step = min(done + rng.randint(1, 4), STEPS - 1)
            proc = start_training(config(*common, f"debug.kill_at_step={step}", f"debug.kill_when={when}"), run)
        history.append((when, step, done))
        assert joined(proc) == -signal.SIGKILL, history

        complete = checkpoint_steps(run)
        for path in (run / "checkpoints").glob("*.pt"):  # nothing partial under a final name
            torch.load(path, weights_only=True)
        if done:
            assert complete and max(complete) >= done, history  # never lost a complete checkpoint
        if when == "checkpoint_write":
            assert step not in complete and len(temp_files(run)) == 1, history  # the half-written temp file
    assert len(history) >= 5

    assert joined(start_training(config(*common), run)) == 0  # the same command, once more
    assert_same_training_state(final_state(run), reference)
    assert logged_steps(run) == list(range(1, STEPS + 1))  # redone steps are logged once
    assert temp_files(run) == []  # leftovers of killed writes are cleaned up


def _tiny_pixel_checkpoint(path: Path) -> Path:
    from dit.io.checkpoint import save_atomic

    model = tiny_dit(in_channels=3)  # pixels; weights off the adaLN-Zero init, so samples depend on them
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "format_version": 1}, path)
    return path


def sample_config(*overrides):
    return compose_config("sample", overrides)


@pytest.mark.slow
def test_bulk_sampling_killed_at_random_points_resumes_to_the_same_npz(tmp_path):
    from dit.sampling.generate import generate_bulk  # what `python sample.py mode=bulk` runs

    ckpt = _tiny_pixel_checkpoint(tmp_path / "pix.pt")
    common = [f"checkpoint={ckpt}", "mode=bulk", "bulk.num_samples=40", "bulk.batch_size=2", "sampler=ddim",
              "sampler.num_steps=25", "seed=3", "device=cpu"]
    uninterrupted = generate_bulk(sample_config(*common, f"bulk.out={tmp_path / 'a.npz'}"))

    out = tmp_path / "c.npz"
    parts = tmp_path / "c.npz.parts"
    rng = random.Random(KILL_SEED)
    for at_least in (2, 8):  # two kills, each at a random moment after some shards are written
        proc = start(generate_bulk, sample_config(*common, f"bulk.out={out}"))
        wait_until(lambda: len(list(parts.glob("shard-*.npz"))) >= at_least, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        assert joined(proc) == -signal.SIGKILL
        assert not out.exists()
    generate_bulk(sample_config(*common, f"bulk.out={out}"))  # the relaunch
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert not parts.exists()


# --------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------


def test_a_corrupt_newest_checkpoint_is_detected_and_the_previous_one_used(tmp_path, reference, caplog):
    run = tmp_path / "run"
    common = ["ckpt.every=4", "ckpt.keep_last=2"]
    run_training(config("max_steps=8", *common), run)
    newest, previous = checkpoint_path(run / "checkpoints", 8), checkpoint_path(run / "checkpoints", 4)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # cut short, e.g. by a copy or a dying file system

    with caplog.at_level(logging.WARNING, logger="dit.train"):
        result = run_training(config(f"max_steps={STEPS}", *common), run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and str(previous) in w and "unreadable" in w for w in warnings), warnings
    assert newest.with_name("0000008.pt.corrupt").is_file()  # kept for inspection, out of the way of pruning
    assert result["step"] == STEPS
    assert_same_training_state(final_state(run), reference)

    # Nothing readable at all: a clear error, not a crash deep in torch.
    lonely = tmp_path / "lonely"
    (lonely / "checkpoints").mkdir(parents=True)
    (lonely / "checkpoints" / "0000004.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read \(0000004.pt: .*truncated"):
        run_training(config("max_steps=8", *common), lonely)


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, reference, monkeypatch):
    import dit.io.checkpoint

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FullDisk(f, room=4096) if ".0000004.pt." in str(path) else f  # the temp file of step 4's save

    monkeypatch.setattr(dit.io.checkpoint, "open", open_on_a_full_disk, raising=False)
    run = tmp_path / "run"
    common = ["ckpt.every=2", "ckpt.keep_last=1"]
    with pytest.raises(CheckpointWriteError) as failed:
        run_training(config(f"max_steps={STEPS}", *common), run)
    message = str(failed.value)
    assert "checkpoint at step 4 failed" in message and "No space left on device" in message
    assert str(checkpoint_path(run / "checkpoints", 4)) in message
    assert f"{checkpoint_path(run / 'checkpoints', 2)}, is kept" in message
    assert failed.value.errno == errno.ENOSPC
    assert sorted(os.listdir(run / "checkpoints")) == ["0000002.pt"]  # no temp file, the old one not pruned
    assert torch.load(checkpoint_path(run / "checkpoints", 2), weights_only=True)["step"] == 2
    monkeypatch.undo()

    run_training(config(f"max_steps={STEPS}", *common), run)  # space freed: relaunch
    assert_same_training_state(final_state(run), reference)


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_preemption_signals_checkpoint_at_the_next_step_exit_75_and_the_requeued_run_resumes(tmp_path, reference):
    run = tmp_path / "run"
    common = [f"max_steps={STEPS}", "ckpt.every=1000"]  # no scheduled checkpoint before the end

    # SIGUSR1 (SLURM's `--signal=USR1@120`) to `python train.py`: its exit status is the point.
    proc = start_script("train.py", [*BASE, *common, f"hydra.run.dir={run}"], cwd=tmp_path,
                        env={"OMP_NUM_THREADS": "1"})
    try:
        assert wait_until(lambda: logged_steps(run) != [] or proc.poll() is not None)
        signalled_after = max(logged_steps(run), default=0)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, output[-3000:]
    (first,) = checkpoint_steps(run)
    assert signalled_after <= first < STEPS
    assert f"preempted (SIGUSR1): wrote checkpoint {checkpoint_path(run / 'checkpoints', first)}" in output

    # SIGTERM (SLURM at preemption or the time limit; torchrun forwards it to its workers), sent
    # as SLURM does to every process of the job: the DataLoader workers too, which must live on
    # until the checkpoint is written.
    proc = start_training(config(*common, "data.num_workers=2"), run, before=os.setpgrp)
    wait_until(lambda: max(logged_steps(run)) > first, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert joined(proc) == 75
    second = max(checkpoint_steps(run))
    assert first < second < STEPS

    # A launcher's own handler (submitit's requeue on SIGUSR2) runs once our checkpoint exists.
    seen = tmp_path / "checkpoints_seen_by_the_launcher.json"

    def launcher_requeues(signum, frame):
        seen.write_text(json.dumps(checkpoint_steps(run)))
        sys.exit(-1)  # what submitit does after `scontrol requeue`

    proc = start_training(config(*common), run, before=lambda: signal.signal(signal.SIGUSR2, launcher_requeues))
    wait_until(lambda: max(logged_steps(run)) > second, proc)
    os.kill(proc.pid, signal.SIGUSR2)
    assert joined(proc) == 255
    third = max(json.loads(seen.read_text()))
    assert second < third < STEPS and checkpoint_steps(run) == [first, second, third]

    run_training(config(*common), run)  # the requeued job: the same command
    assert_same_training_state(final_state(run), reference)
    assert logged_steps(run) == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------------------
# Numerical faults
# --------------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_and_counted_and_k_in_a_row_stop_the_run(tmp_path):
    run = tmp_path / "run"
    faults = ["debug.nan_loss_at_steps=[3]", "debug.nan_grad_at_steps=[6,7]"]
    common = ["max_steps=10", "ckpt.every=1", "ckpt.keep_last=null", "fault.max_nonfinite_steps=2"]
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_training(config(*common, *faults), run)
    message = str(stopped.value)
    assert "stopped at step 7" in message and "2 consecutive steps, 6..7" in message
    assert f"newest checkpoint, {checkpoint_path(run / 'checkpoints', 6)}, is intact" in message
    assert "optim.lr" in message and "\n" not in message
    assert checkpoint_steps(run) == [1, 2, 3, 4, 5, 6]  # nothing written at the stop

    ckpt = {s: torch.load(checkpoint_path(run / "checkpoints", s), weights_only=True) for s in (2, 3, 4, 5, 6)}
    # Step 3 (NaN loss) and step 6 (inf gradient) changed nothing: no optimizer step, no EMA update.
    assert_same_training_state({**ckpt[2], "step": 3}, ckpt[3])
    assert_same_training_state({**ckpt[5], "step": 6}, ckpt[6])
    assert not torch.equal(ckpt[4]["model"]["final_layer.linear.weight"], ckpt[3]["model"]["final_layer.linear.weight"])
    assert all(torch.isfinite(v).all() for v in ckpt[6]["model"].values())  # the last checkpoint is good
    assert ckpt[3]["nonfinite_steps"] == {"total": 1, "consecutive": 1}
    assert ckpt[6]["nonfinite_steps"] == {"total": 2, "consecutive": 1}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/skipped_steps"] for m in lines] == [0, 0, 1, 1, 1, 2]
    assert np.isnan(lines[2]["train/loss"]) and np.isfinite(lines[3]["train/loss"])

    result = run_training(config(*common), run)  # the fault gone (say, a lower lr): resumes from step 6
    assert result["step"] == 10 and result["skipped_steps"] == 2


# --------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------


def _image_folder(root: Path) -> Path:
    from dit.data.toy import write_toy_imagefolder

    return write_toy_imagefolder(root, num_per_class=1, image_size=16, seed=0)  # 10 classes, 1 image each


def test_unreadable_images_stop_training_naming_the_file_or_are_skipped_and_counted(tmp_path):
    from dit.data import BadImageError

    root = _image_folder(tmp_path / "images")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    good = next(first_class.glob("*.png")).read_bytes()
    truncated, not_an_image = first_class / "truncated.png", first_class / "notes.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_an_image.write_bytes(b"this is not a png")
    common = ["data=imagefolder", f"data.root={root}", "global_batch_size=12", "max_steps=2", "ckpt.every=1000"]

    with pytest.raises(BadImageError, match=r"cannot read image .*(truncated|notes)\.png.*skip_bad"):
        run_training(config(*common), tmp_path / "strict")
    assert not (tmp_path / "strict" / "checkpoints").exists()

    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        result = run_training(config(*common, "data.skip_bad=true"), tmp_path / "lenient")
    assert result["step"] == 2
    skipped = {str(p) for p in (truncated, not_an_image) if any(str(p) in str(w.message) for w in caught)}
    assert skipped == {str(truncated), str(not_an_image)}  # each named (and counted once)


def test_a_start_up_scan_finds_bad_images_before_the_first_step(tmp_path):
    from dit.data import BadImageError

    root = _image_folder(tmp_path / "images")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "empty.png").write_bytes(b"")  # a zero-byte file: fails whenever it is drawn
    common = ["data=imagefolder", f"data.root={root}", "global_batch_size=5", "max_steps=2", "ckpt.every=1000",
              "data.scan=true"]

    with pytest.raises(BadImageError, match=r"cannot read image .*empty\.png"):
        run_training(config(*common), tmp_path / "strict")
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()  # stopped before the first step

    with pytest.warns(UserWarning, match="skipping unreadable image .*empty.png"):
        result = run_training(config(*common, "data.skip_bad=true"), tmp_path / "lenient")
    assert result["step"] == 2
    saved = torch.load(result["checkpoint"], weights_only=True)
    assert saved["data_state"]["dataset_size"] == 10  # the bad file left the index at start-up


def test_bad_datasets_fail_before_training_starts(tmp_path):
    from dit.autoencoder import build_autoencoder
    from dit.data import CacheFormat, CacheRun, build_latent_cache

    root = _image_folder(tmp_path / "images")
    empty_class = root / "zz_empty"
    empty_class.mkdir()
    with pytest.raises(ValueError, match=f"empty class folder.*{re.escape(str(empty_class))}.*add images or remove"):
        run_training(config("data=imagefolder", f"data.root={root}", "max_steps=1"), tmp_path / "a")
    empty_class.rmdir()

    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty dataset: no image files"):
        run_training(config("data=imagefolder", f"data.root={no_images}", "max_steps=1"), tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()

    # A latents cache whose shapes do not fit the checkpoint to continue from: 8x8 images
    # (8x8 latents) under a model trained on 16x16.
    trained = run_training(config("data=imagefolder", f"data.root={root}", "max_steps=1", "global_batch_size=10"),
                           tmp_path / "trained")["checkpoint"]
    cache = build_latent_cache(root, build_autoencoder("pixel"), tmp_path / "cache8", 8, fmt=CacheFormat(dtype="float32"),
                               run=CacheRun(num_workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"does not fit the model this run builds from its config and latents cache "
                                          r".*input_size: checkpoint 16 vs now 8"):
        run_training(config("data=latents", f"data.root={cache}", "data.image_size=null", "max_steps=2",
                            "global_batch_size=10", f"resume={trained}"), tmp_path / "c")
    assert not (tmp_path / "c" / "checkpoints").exists()


# --------------------------------------------------------------------------------------
# Bad input everywhere else
# --------------------------------------------------------------------------------------


class _NoFeatures:
    """Stands in for the Inception feature extractor where no features may be computed."""

    name, identity = "inception", "inception-stub"

    def extract(self, images, progress=False):
        raise AssertionError("no features should be needed")


def test_bad_inputs_give_one_line_errors_that_name_problem_and_fix_and_corrupt_nothing(tmp_path):
    import dit.scoring.metrics as M
    from dit.sampling.images import sample_latents
    from dit.sampling.settings import SamplerSettings
    from dit.autoencoder import build_autoencoder
    from dit.io.npz import write_samples_npz

    ckpt = _tiny_pixel_checkpoint(tmp_path / "pix.pt")
    model, _ = load_dit_checkpoint(ckpt)
    pixel = build_autoencoder("pixel")
    noise = torch.randn(2, 3, 8, 8)
    samples = write_samples_npz(tmp_path / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8))
    ddim2 = SamplerSettings(sampler="ddim", num_steps=2)
    out = bulk_sample_with(model, None, pixel, tmp_path / "bulk.npz", ddim2, num_samples=2, seed=0, batch_size=2,
                      progress=False)
    written = {p: p.read_bytes() for p in (samples, out, ckpt)}
    np.savez(tmp_path / "ref.npz", features=np.zeros((4, 3)))

    cases = {  # what: (call, error type, pattern naming the problem ... and the fix)
        "unknown model name": (lambda: load_dit_checkpoint(ckpt, model_name="DiT-Q/3"), ValueError,
                               r"unknown model 'DiT-Q/3': choose one of DiT-S/2"),
        "class label out of range": (lambda: sample_latents(model, None, torch.tensor([0, 5]),
                                                              SamplerSettings(cfg_scale=1.5, num_steps=2), noise=noise),
                                     ValueError, r"class label 5 is out of range: this model has classes 0\.\.4"),
        "cfg scale < 0": (lambda: sample_latents(model, None, torch.tensor([0, 1]),
                                                   SamplerSettings(cfg_scale=-0.5, num_steps=2), noise=noise), ValueError, r"cfg_scale must be >= 0 \(1 = no guidance\)"),
        "sample count <= 0": (lambda: bulk_sample_with(model, None, pixel, out, SamplerSettings(), num_samples=0, seed=0,
                                                  batch_size=32), ValueError,
                              r"num_samples must be >= 1, got 0"),
        "ref .npz without mu/sigma or images": (
            lambda: M.load_reference(tmp_path / "ref.npz", _NoFeatures()), ValueError,
            r"has no images \(arr_0\) and no mu/sigma .*give a reference made with this extractor, or images"),
        "samples not uint8": (lambda: write_samples_npz(samples, np.zeros((2, 8, 8, 3), np.float32)), TypeError,
                              r"samples must be uint8 .*convert samples in \[-1, 1\] with dit.io.images.to_uint8"),
        "other settings into an existing .npz": (
            lambda: bulk_sample_with(model, None, pixel, out, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=3.0),
                                num_samples=2, seed=0, batch_size=2, progress=False),
            ValueError, r"different settings \(cfg_scale\): delete it to start over, or choose another output path"),
    }
    for what, (call, kind, pattern) in cases.items():
        with pytest.raises(kind, match=pattern) as e:
            call()
        assert "\n" not in str(e.value), what

    # Wrong checkpoint for the model: a report listing keys and shapes, whose first line says what
    # does not fit and whose last line says what to do.
    with pytest.raises(CheckpointError) as e:
        load_dit_checkpoint(ckpt, model_name="DiT-B/4")
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"checkpoint '{ckpt}' does not fit DiT-B/4") and lines[-1].startswith("Fix: pass")

    assert all(p.read_bytes() == data for p, data in written.items())  # nothing written was touched


# --------------------------------------------------------------------------------------
# Hostile files
# --------------------------------------------------------------------------------------


class _RunsCodeOnLoad:
    """Unpickling this creates a marker file: a stand-in for a payload that runs a command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_load_path_runs_code_from_a_crafted_file(tmp_path):
    """The load paths not already covered elsewhere (ours and release files through
    load_dit_checkpoint: test_checkpoint.py; latents cache shards: test_data.py; sample files
    and Inception weights: test_metrics.py)."""
    import dit.scoring.metrics as M
    from dit.autoencoder import build_autoencoder
    from dit.sampling.loading import load_for_sampling
    from dit.sampling.settings import SamplerSettings

    marker = tmp_path / "pwned"
    payload = _RunsCodeOnLoad(marker)
    weights = _tiny_pixel_checkpoint(tmp_path / "good.pt")
    good = torch.load(weights, weights_only=True)

    # Training: a planted checkpoint in the run directory (refused, not skipped as merely corrupt),
    # and resume= pointing at one.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({**good, "opt": {}, "rng": payload}, run / "checkpoints" / "0000009.pt")
    with pytest.raises(UnsafeCheckpointError, match="0000009.pt.*arbitrary Python objects and is refused"):
        run_training(config("max_steps=1"), run)
    assert (run / "checkpoints" / "0000009.pt").is_file()
    evil = tmp_path / "evil.pt"
    torch.save({**good, "opt": payload}, evil)
    with pytest.raises(UnsafeCheckpointError):
        run_training(config("max_steps=1", f"resume={evil}"), tmp_path / "fresh")

    # Sampling: a release-format file (a plain state dict) with a payload among the tensors.
    release = tmp_path / "DiT-release.pt"
    torch.save({**good["ema"], "pos_embed": payload}, release)
    with pytest.raises(UnsafeCheckpointError):
        load_for_sampling(release, vae="pixel")

    # Reference statistics: an object array (pickled) where `mu` should be.
    np.savez(tmp_path / "ref.npz", mu=np.array([payload], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="without unpickling"):
        M.load_reference(tmp_path / "ref.npz", _NoFeatures())

    # Resuming bulk sampling: a planted shard among the finished ones.
    model, _ = load_dit_checkpoint(weights)
    parts = tmp_path / "out.npz.parts"
    parts.mkdir()
    np.savez(parts / "shard-00000000.npz", idx=np.array([payload], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        bulk_sample_with(model, None, build_autoencoder("pixel"), tmp_path / "out.npz",
                    SamplerSettings(sampler="ddim", num_steps=2), num_samples=2, seed=0, batch_size=2, progress=False)

    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


# --------------------------------------------------------------------------------------
# Distributed faults
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dying_rank_makes_the_others_exit_nonzero_in_bounded_time_and_the_relaunch_resumes(tmp_path, caplog):
    run = tmp_path / "run"
    common = ["max_steps=8", "ckpt.every=2", "fault.dist_timeout_minutes=1"]
    proc = start_script("train.py", [*BASE, *common, f"hydra.run.dir={run}",
                                     "debug.kill_at_step=5", "debug.kill_rank=1"],  # rank 1 dies (SIGKILL) after step 5
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, ranks=2)
    try:
        wait_until(lambda: 5 in logged_steps(run) or proc.poll() is not None, timeout=240)
        died = time.monotonic()  # rank 0 logged step 5, which rank 1 does not survive
        output, _ = proc.communicate(timeout=120)
        waited = time.monotonic() - died
    finally:
        proc.kill()
    assert proc.returncode != 0, output[-3000:]
    assert 5 in logged_steps(run) and 6 not in logged_steps(run), output[-3000:]
    assert waited < 60, waited
    assert checkpoint_steps(run) == [2, 4]

    with caplog.at_level(logging.INFO, logger="dit.train"):
        result = run_training(config(*common), run)  # relaunched (here on one process)
    assert any("(step 4)" in r.getMessage() and "resuming from" in r.getMessage() for r in caplog.records)
    assert result["step"] == 8 and logged_steps(run) == list(range(1, 9))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_hung_rank_makes_the_others_fail_after_the_configured_timeout(tmp_path):
    run = tmp_path / "run"
    cfg = config("max_steps=8", "ckpt.every=1000", "fault.dist_timeout_minutes=0.2",  # 12 s
                 "debug.kill_at_step=3", "debug.kill_how=hang", "debug.kill_rank=1")
    port = _free_port()

    def rank(r):
        os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        try:
            run_training(cfg, run)
        except Exception as err:
            (tmp_path / f"rank{r}.error").write_text(f"{type(err).__name__}: {err}")
            raise

    ranks = [start(rank, r) for r in range(2)]
    try:
        wait_until(lambda: 3 in logged_steps(run) or not ranks[0].is_alive(), timeout=120)
        hung = time.monotonic()
        code = joined(ranks[0], timeout=90)
        waited = time.monotonic() - hung
    finally:
        for proc in ranks:  # the hung rank: torchrun or the scheduler would kill it
            proc.kill()
            proc.join()
    assert code not in (0, None) and 3 in logged_steps(run) and 4 not in logged_steps(run)
    assert re.search(r"Timed out waiting 12000 ?ms", (tmp_path / "rank0.error").read_text())  # as configured ...
    assert waited < 60, waited  # ... 12 s, not the default 30 minutes


def test_skipped_images_are_logged_to_the_run_log_not_only_stderr(tmp_path):
    """hydra's job logging writes train.log from the root logger: a skipped file must reach it."""
    root = _image_folder(tmp_path / "images")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "empty.png").write_bytes(b"")
    run_log = tmp_path / "train.log"
    handler = logging.FileHandler(run_log)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            run_training(config("data=imagefolder", f"data.root={root}", "global_batch_size=5", "max_steps=1",
                                "ckpt.every=1000", "data.skip_bad=true", "data.scan=true"), tmp_path / "run")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert re.search(r"skipping unreadable image .*empty\.png", run_log.read_text()), run_log.read_text()


def _flip_a_bit_in_a_tensor_record(path: Path) -> None:
    """What bit rot or a bad copy does: one bit of tensor data changes; the file still unpickles
    (torch does not check the zip records' CRCs)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_a_flipped_bit_fails_its_checksum_and_the_previous_one_is_used(tmp_path, reference,
                                                                                        caplog):
    run = tmp_path / "run"
    common = ["ckpt.every=4", "ckpt.keep_last=2"]
    run_training(config("max_steps=8", *common), run)
    newest, previous = checkpoint_path(run / "checkpoints", 8), checkpoint_path(run / "checkpoints", 4)
    intact = torch.load(newest, weights_only=True)
    _flip_a_bit_in_a_tensor_record(newest)
    flipped = torch.load(newest, weights_only=True)  # what resumed silently before checksums
    changed = [name for (name, a), (_, b) in zip(named_tensors(intact), named_tensors(flipped))
               if not torch.equal(a, b)]
    assert flipped["step"] == 8 and len(changed) == 1, changed

    with pytest.raises(CheckpointError, match=r"fails its SHA-256 check: its content changed after it was written"):
        load_dit_checkpoint(newest)  # sampling refuses it too
    with caplog.at_level(logging.WARNING, logger="dit.train"):
        result = run_training(config(f"max_steps={STEPS}", *common), run)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and str(previous) in w and "SHA-256" in w for w in warnings_), warnings_
    assert newest.with_name("0000008.pt.corrupt").is_file()
    assert result["step"] == STEPS
    assert_same_training_state(final_state(run), reference)
