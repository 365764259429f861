"""Every CLI's known failures end in one line: exit status 1, stderr exactly `error: ...` naming
the key or file and the fix, no traceback (dit/cli/errors.py); HYDRA_FULL_ERROR=1 brings the
traceback back, and a bug (an error we did not foresee) always keeps it.

The programs run in this process through the same `run()` a console script calls (sys.argv set,
stdout/stderr captured): hydra's composition, `run_program` and `reports_errors` exactly as on
the command line, at a fraction of a subprocess's start-up (5-8 s each on the project's CPU
machine). Two true subprocesses check what only a separate process shows: that nothing else
reaches stderr, and `HYDRA_FULL_ERROR=1`'s traceback (through `python -m dit.cache_latents`).
The failures and their messages are listed in docs/training.md ("When something is wrong").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit.io.checkpoint import save_atomic
from dit.cli import eval_fid as eval_cli
from dit.cli import sample as sample_cli
from dit.cli.errors import MAX_DETAIL_LINES, error_message
from dit.config import ConfigError
from dit.io.npz import write_samples_npz

from conftest import REPO, TINY_MODEL, assert_one_line, run_program, run_script, tiny_dit

TINY_TRAIN = [*TINY_MODEL, "max_steps=1", "global_batch_size=2", "log.samples.every=0"]


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: hydra configures logging per job


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """What the failures are made of: a tiny pixel-space checkpoint of ours, files that are not
    checkpoints or not ours, sample and reference files, image folders good and bad."""
    root = tmp_path_factory.mktemp("cli_files")
    model = tiny_dit(in_channels=3, num_classes=5, input_size=8)
    ckpt = save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 11, "model_name": None,
                        "model_config": model.config.to_dict(),
                        "autoencoder": {"name": "pixel", "scale_factor": 1.0}, "format_version": 1}, root / "pix.pt")
    (root / "notes.txt").write_text("not a checkpoint, not an npz\n")
    foreign = save_atomic({"state": {"w": torch.zeros(3)}, "epoch": 4}, root / "foreign.pt")  # someone else's
    samples = write_samples_npz(root / "samples.npz", np.zeros((4, 8, 8, 3), np.uint8))
    flat = root / "flat"  # images, but not in class folders: not an ImageFolder
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    empty = root / "empty"
    empty.mkdir()
    return {"root": root, "ckpt": ckpt, "text": root / "notes.txt", "foreign": foreign, "samples": samples,
            "flat": flat, "empty": empty, "missing": root / "missing.pt"}


# The known failures: (program, its arguments (built from `files`), what the line must name).
# Each name is the key or the file, plus a word of the fix where the message gives one.
CASES = {
    "unknown config group choice": ("train.py", lambda f: ["model=DiT-Q/9"], ["model", "DiT-Q-9", "DiT-S-2"]),
    "key not in the schema": ("train.py", lambda f: ["optim.lrr=1e-4"], ["lrr"]),
    "value of the wrong type": ("train.py", lambda f: ["max_steps=many"], ["max_steps", "many"]),
    "missing data root": ("train.py", lambda f: [*TINY_TRAIN, "data=imagefolder", f"data.root={f['root']}/nope"],
                          ["nope"]),
    "folder that is not an ImageFolder": ("train.py", lambda f: [*TINY_TRAIN, "data=imagefolder",
                                                                 f"data.root={f['flat']}"], ["flat"]),
    "missing resume checkpoint": ("train.py", lambda f: [*TINY_TRAIN, "data=toy", f"resume={f['missing']}"],
                                  ["missing.pt"]),
    "resume from a file that is not a checkpoint": (
        "train.py", lambda f: [*TINY_TRAIN, "data=toy", f"resume={f['text']}"], ["notes.txt"]),
    "sample: missing checkpoint": ("sample.py", lambda f: [f"checkpoint={f['missing']}", "device=cpu"],
                                   ["missing.pt"]),
    "sample: a file that is not a checkpoint": ("sample.py", lambda f: [f"checkpoint={f['text']}", "device=cpu"],
                                                ["notes.txt"]),
    "sample: a checkpoint that is not ours": ("sample.py", lambda f: [f"checkpoint={f['foreign']}", "device=cpu"],
                                              ["foreign.pt"]),
    "sample: a checkpoint for another model": (
        "sample.py", lambda f: [f"checkpoint={f['ckpt']}", "model_name=DiT-B/4", "device=cpu"], ["DiT-B/4"]),
    "sample: bad sampler name": ("sample.py", lambda f: [f"checkpoint={f['ckpt']}", "sampler=eulerr"],
                                 ["sampler", "eulerr"]),
    "sample: bad cfg_scale": ("sample.py", lambda f: [f"checkpoint={f['ckpt']}", "grid.cfg_scale=-2", "device=cpu"],
                              ["cfg_scale"]),
    "sample: bulk.out with the wrong suffix": (
        "sample.py", lambda f: [f"checkpoint={f['ckpt']}", "mode=bulk", "bulk.num_samples=2", "sampler=ddim",
                                "sampler.num_steps=2", "device=cpu", f"bulk.out={f['root']}/out.png"], ["out.png"]),
    "eval: unknown metric": ("eval_fid.py", lambda f: [f"samples={f['samples']}", f"reference={f['samples']}",
                                                       "metrics=[fid,fdd]"], ["fdd"]),
    "eval: missing reference": ("eval_fid.py", lambda f: [f"checkpoint={f['ckpt']}", "feature_extractor=toy_judge",
                                                          f"reference={f['root']}/ref.npz"], ["reference", "ref.npz"]),
    "eval: reference not an npz": ("eval_fid.py", lambda f: [f"checkpoint={f['ckpt']}", "feature_extractor=toy_judge",
                                                             f"reference={f['text']}"], ["notes.txt", ".npz"]),
    "eval: missing Inception weights": (
        "eval_fid.py", lambda f: [f"checkpoint={f['ckpt']}", f"reference={f['samples']}", "allow_download=false",
                                  f"feature_extractor_weights={f['root']}/inception.pth"], ["inception.pth"]),
    "eval: samples file missing": ("eval_fid.py", lambda f: [f"samples={f['root']}/gone.npz",
                                                             f"reference={f['samples']}"], ["gone.npz"]),
    "eval: neither samples nor checkpoint": ("eval_fid.py", lambda f: [f"reference={f['samples']}"],
                                             ["samples=", "checkpoint="]),
    "cache_latents: bad vae_dtype": ("cache_latents", lambda f: [f"data_root={f['flat'].parent}",
                                                                 f"out_dir={f['root']}/c", "vae=pixel",
                                                                 "vae_dtype=float13"], ["vae_dtype", "float13"]),
    "cache_latents: missing data root": ("cache_latents", lambda f: [f"data_root={f['root']}/nope",
                                                                     f"out_dir={f['root']}/c", "vae=pixel"], ["nope"]),
    "cache_latents: data root not an ImageFolder": (
        "cache_latents", lambda f: [f"data_root={f['empty']}", f"out_dir={f['root']}/c", "vae=pixel"], ["empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_known_failure_ends_in_one_line(case, files, tmp_path, capsys, monkeypatch):
    program, args, names = CASES[case]
    monkeypatch.chdir(tmp_path)  # run directories and default outputs land here
    code, _, err = run_program(program, args(files), capsys, monkeypatch)
    assert_one_line(code, err, *names)


def test_a_busy_run_directory_ends_in_one_line(files, tmp_path, capsys, monkeypatch):
    """Another process holds the run directory's lock (a POSIX lock: a second holder must be
    another process, so a small python child takes it and waits)."""
    run_dir = tmp_path / "outputs" / "busy"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(tmp_path)
        code, _, err = run_program("train.py", [*TINY_TRAIN, "data=toy", f"hydra.run.dir={run_dir}"], capsys,
                                   monkeypatch)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line(code, err, str(run_dir))


def test_eval_checks_everything_scoring_needs_before_sampling(files, tmp_path, capsys, monkeypatch):
    """Missing Inception weights, a missing or unreadable reference, an unknown metric: refused
    before one sample is generated (generating can take hours; the check takes seconds)."""
    calls = []
    monkeypatch.setattr(eval_cli, "generate_bulk", lambda cfg: calls.append(cfg))
    monkeypatch.chdir(tmp_path)
    common = [f"checkpoint={files['ckpt']}", "bulk.num_samples=2", "device=cpu"]
    for args in ([f"reference={files['samples']}", "allow_download=false",
                  f"feature_extractor_weights={files['root']}/inception.pth"],
                 ["feature_extractor=toy_judge", f"reference={files['root']}/ref.npz"],
                 ["feature_extractor=toy_judge", f"reference={files['text']}"],
                 ["feature_extractor=toy_judge", f"reference={files['samples']}", "metrics=[fid,fdd]"],
                 ["feature_extractor=judge", f"reference={files['samples']}"]):
        code, _, err = run_program("eval_fid.py", [*common, *args], capsys, monkeypatch)
        assert_one_line(code, err)
    assert calls == []  # nothing was generated
    assert not list(tmp_path.rglob("*.npz"))


def test_hydra_full_error_gives_the_exception_and_a_bug_keeps_its_traceback(files, tmp_path, capsys, monkeypatch):
    """In process: with HYDRA_FULL_ERROR=1 a known failure propagates (the interpreter prints its
    traceback); an error that is not a known failure always propagates, with no `error:` line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sample.py", f"checkpoint={files['missing']}", "device=cpu"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(OSError, match="missing.pt"):
        sample_cli.run()
    monkeypatch.delenv("HYDRA_FULL_ERROR")

    def broken(cfg):
        raise RuntimeError("an unforeseen bug")

    monkeypatch.setattr(eval_cli, "generate_and_evaluate", broken)
    monkeypatch.setattr(sys, "argv", ["eval_fid.py", f"samples={files['samples']}", f"reference={files['samples']}"])
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="an unforeseen bug"):
        eval_cli.run()
    assert "error:" not in capsys.readouterr().err
    assert os.environ.get("HYDRA_FULL_ERROR") is None  # run_program restored the environment


def _subprocess(script: str, args: list[str], cwd: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    """`script args...` in a new process in `cwd` (`run_script`; HYDRA_FULL_ERROR="" counts as
    unset): (the process, its wall seconds)."""
    start = time.perf_counter()
    proc = run_script(script, args, cwd=cwd, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_true_subprocesses_print_one_line_and_full_error_prints_the_traceback(files, tmp_path):
    """What only a separate process shows: nothing else on stderr (warnings, hydra's own report),
    and HYDRA_FULL_ERROR=1's traceback printed (here through `python -m dit.cache_latents`)."""
    proc, seconds = _subprocess("eval_fid.py", [f"checkpoint={files['ckpt']}", "device=cpu",
                                                f"reference={files['samples']}", "allow_download=false",
                                                "bulk.num_samples=2",
                                                f"feature_extractor_weights={files['root']}/inception.pth"],
                                tmp_path, HYDRA_FULL_ERROR="")
    assert_one_line(proc.returncode, proc.stderr, "inception.pth")
    assert not list(tmp_path.rglob("*.npz"))  # failed before sampling
    print(f"eval_fid.py with missing Inception weights failed after {seconds:.2f} s (process start included)")

    # `python -m dit.cache_latents` with HYDRA_FULL_ERROR=1: a missing data root, with its traceback.
    proc, _ = _subprocess("dit.cache_latents", [f"data_root={files['root']}/nope", f"out_dir={tmp_path}/c",
                                                "vae=pixel"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "nope" in proc.stderr
    assert not proc.stderr.startswith("error: ")


def test_a_listing_message_is_joined_into_one_line_with_its_fix_kept():
    """A message that lists things (tensors, config keys) becomes one line: the first line, at
    most MAX_DETAIL_LINES of the list, a count of the rest, and the last line (the fix)."""
    listed = [f"  key{i}: 1 vs 2" for i in range(MAX_DETAIL_LINES + 5)]
    err = ConfigError("\n".join(["the run directory r holds a run with a different configuration:", *listed,
                                 "Start a new run with name=<new name>"]))
    line = error_message(err)
    assert "\n" not in line
    assert line == ("error: the run directory r holds a run with a different configuration: "
                    + "; ".join(item.strip() for item in listed[:MAX_DETAIL_LINES])
                    + "; ... and 5 more (HYDRA_FULL_ERROR=1 shows them); Start a new run with name=<new name>")
    assert error_message(ConfigError("short\nFix: this")) == "error: short; Fix: this"
    assert error_message(FileNotFoundError("no file x")) == "error: FileNotFoundError: no file x"


@pytest.mark.slow
def test_the_programs_still_succeed_through_the_shared_hydra_program(files, tmp_path, capsys, monkeypatch):
    """sample.py and eval_fid.py are built by one helper (`dit.cli.errors.hydra_program`): a run
    that should work exits normally and writes its outputs."""
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.png"
    code, out, err = run_program("sample.py", [f"checkpoint={files['ckpt']}", "sampler=ddim", "sampler.num_steps=2",
                                               "grid.labels=[0,1]", "device=cpu", f"grid.out={grid}"],
                                 capsys, monkeypatch)
    assert code == 0 and "error:" not in err, err
    grad_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # back to pytest's state before any assert can fail
    assert not grad_enabled  # sample.py's setup ran
    assert Image.open(grid).size[0] > 8
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    samples = write_samples_npz(tmp_path / "s.npz", images)
    code, out, err = run_program("eval_fid.py", [f"samples={samples}", f"reference={samples}", "device=cpu",
                                                 "feature_extractor=toy_judge", f"cache_dir={tmp_path / 'cache'}",
                                                 "metrics=[fid]", "results_table=null"], capsys, monkeypatch)
    assert code == 0 and "error:" not in err, err
    assert "fid" in out and (tmp_path / "s.toy_judge.metrics.json").is_file()
