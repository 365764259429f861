"""Issue 21, item 10: a sweep over a key left out of job folder names (`train.py -m
optim.grad_accum_steps=1,2`) put both jobs in one folder: the second resumed the first's finished
run, did nothing, exited 0 and rewrote its `overrides.yaml`. The keys of NOT_IN_JOB_NAME stay out
of the names on purpose (a relaunch that changes them resumes the same job), so such a sweep is
refused before any job starts, in one error line naming the jobs, the key and the fix, and
nothing is created or rewritten."""

from pathlib import Path

import pytest

from dit.config import ConfigError
from dit.config.overrides import check_distinct_job_dirs

from conftest import TINY_RUN, assert_one_line, run_program, with_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [*with_overrides(TINY_RUN, "max_steps=1"), "data.num_workers=0", "ckpt.every_minutes=null"]


def sweep(sweep_dir: Path, capsys, monkeypatch, *overrides: str) -> tuple[int, str, str]:
    return run_program("train.py", ["-m", *RUN, *overrides, f"hydra.sweep.dir={sweep_dir}"], capsys, monkeypatch)


def files(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_sweep_over_a_key_left_out_of_job_folder_names_is_refused_before_any_job_starts(
        tmp_path, capsys, monkeypatch):
    code, _, err = sweep(tmp_path / "multirun", capsys, monkeypatch, "optim.grad_accum_steps=1,2")
    assert_one_line(code, err, "sweep refused before any job started",
                    "optim.grad_accum_steps=1 and optim.grad_accum_steps=2",
                    "optim.grad_accum_steps is left out of job folder names", "hydra.sweep.dir=", "name=")
    assert not (tmp_path / "multirun").exists()  # no sweep folder, no multirun.yaml, no job folder


def test_a_refused_sweep_rewrites_nothing_of_the_job_already_in_its_folder(tmp_path, capsys, monkeypatch):
    root = tmp_path / "multirun"
    code, _, err = sweep(root, capsys, monkeypatch, "optim.grad_accum_steps=1")  # the first job, alone
    assert code == 0, err
    (job,) = [p for p in root.iterdir() if p.is_dir()]
    assert (job / "checkpoints" / "0000001.pt").is_file()
    before = files(root)
    assert b"optim.grad_accum_steps=1" in before[f"{job.name}/.hydra/overrides.yaml"]

    code, _, err = sweep(root, capsys, monkeypatch, "optim.grad_accum_steps=1,2")
    assert_one_line(code, err, "optim.grad_accum_steps is left out of job folder names", job.name)
    assert files(root) == before  # overrides.yaml, .hydra/, train.log, multirun.yaml: all as they were


def test_a_sweep_over_a_run_defining_key_runs_every_job_in_its_own_folder(tmp_path, capsys, monkeypatch):
    root = tmp_path / "multirun"
    code, _, err = sweep(root, capsys, monkeypatch, "optim.lr=1e-3,2e-3", "optim.grad_accum_steps=2")
    assert code == 0, err
    jobs = sorted(p for p in root.iterdir() if p.is_dir())
    assert [("optim.lr=0.001" in p.name, "optim.lr=0.002" in p.name) for p in jobs] == [(True, False), (False, True)]
    assert all((p / "checkpoints" / "0000001.pt").is_file() for p in jobs)


def test_only_jobs_that_share_a_folder_are_refused():
    check_distinct_job_dirs([["optim.lr=0.001", "max_steps=5"], ["optim.lr=0.002", "max_steps=5"]], "multirun")
    check_distinct_job_dirs([["optim.grad_accum_steps=2"]], "multirun")  # one job: nothing to share

    both = [[f"optim.lr={lr}", f"optim.grad_accum_steps={k}", "log.every=1"] for lr in (1, 2) for k in (1, 2)]
    with pytest.raises(ConfigError, match=r"optim.grad_accum_steps=1 and optim.grad_accum_steps=2 would run in one "
                                          r"folder, multirun/optim.lr=1 \(and 1 other folder\(s\) likewise\), "
                                          r"because optim.grad_accum_steps is left out"):
        check_distinct_job_dirs(both, "multirun")
    with pytest.raises(ConfigError, match=r"2 of its jobs are the same job \(seed=1\).*list each value once"):
        check_distinct_job_dirs([["seed=1"], ["seed=1"]], "multirun")
    with pytest.raises(ConfigError, match="max_steps, log.every are left out"):
        check_distinct_job_dirs([["max_steps=1", "log.every=1"], ["max_steps=2", "log.every=2"]], "multirun")
