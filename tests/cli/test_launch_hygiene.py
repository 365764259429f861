"""Issue 23, item 6 (part): what a launch leaves behind and prints when nothing is wrong with it.

- A launch refused for a config error leaves no empty `outputs/<name>/` (nor the `outputs/` it
  created); a folder that holds anything, or was there before, is never removed.
- diffusers' "install accelerate" notice, logged at every autoencoder load, is not printed.
- `data=imagefolder` (and cache_latents) start as many DataLoader workers as the machine has,
  at most 4, instead of 4 on a 2-core machine (which made torch warn); an explicit number stays,
  and the count is left out of what a resumed run must match.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from torch.utils.data import Dataset

from dit.cli import cache_latents as cache_cli
from dit.cli import train as train_cli
from dit.config import config_mismatches, job_dirname
from dit.data import CacheRun
from dit.distributed import DistEnv
from dit.train.stream import DataStream

from conftest import assert_one_line, compose_config, run_program, train_config


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: hydra configures logging per job


REFUSED = ["experiment=quickstart", "model.depth=-1"]  # refused before step 1: "model.depth must be positive"


# ------------------------------------------------------------------------------ empty run folders


def test_a_refused_launch_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("train.py", [*REFUSED, "name=refused"], capsys, monkeypatch)
    assert_one_line(code, err, "model.depth")
    code, _, err = run_program("train.py", [*REFUSED, "name=group/refused"], capsys, monkeypatch)
    assert_one_line(code, err, "model.depth")
    code, _, err = run_program("train.py", [*REFUSED, f"hydra.run.dir={tmp_path / 'runs' / 'deep' / 'r'}"], capsys,
                               monkeypatch)
    assert_one_line(code, err, "model.depth")
    assert list(tmp_path.iterdir()) == []  # not outputs/refused, outputs/group/refused, outputs/, runs/deep/r


def test_a_folder_that_holds_anything_or_was_there_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "outputs" / "kept"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("a real run's file\n")
    empty = tmp_path / "outputs" / "made-by-hand"
    empty.mkdir()
    for name in ("kept", "made-by-hand"):
        code, _, err = run_program("train.py", [*REFUSED, f"name={name}"], capsys, monkeypatch)
        assert_one_line(code, err, "model.depth")
    assert (kept / "notes.txt").read_text() == "a real run's file\n"
    assert empty.is_dir()  # not created by the launch: not the launch's to remove


def test_a_launch_that_runs_keeps_its_folder(tmp_path, capsys, monkeypatch):
    """Only a failed launch removes anything (its run folder, still empty)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli, "run_training", lambda cfg, **kw: None)  # ran, wrote nothing
    code, _, err = run_program("train.py", ["experiment=quickstart", "name=ok"], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "outputs" / "ok").is_dir()


def test_a_sweep_leaves_no_empty_job_folders(tmp_path, capsys, monkeypatch):
    """Each refused job's folder goes; the sweep folder keeps hydra's multirun.yaml."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    code, _, err = run_program("train.py", ["-m", "experiment=quickstart", "model.depth=-1,-2",
                                            f"hydra.sweep.dir={sweep}"], capsys, monkeypatch)
    assert code == 1 and "model.depth must be positive" in err, err
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]


# ------------------------------------------------------------------------------ the accelerate notice


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_accelerate_notice_is_not_printed(tiny_vae_dir):
    """Loading an autoencoder (what sample.py, eval_fid.py, train.py and cache_latents do with
    vae=...) logs no advice to install accelerate; diffusers' other warnings still come through."""
    from dit.autoencoder import build_autoencoder

    handler = _Records()
    library = logging.getLogger("diffusers")  # diffusers' records stop here (propagate=False)
    library.addHandler(handler)
    try:
        build_autoencoder(str(tiny_vae_dir), device="cpu")
        logging.getLogger("diffusers.models.modeling_utils").warning("another diffusers warning")
    finally:
        library.removeHandler(handler)
    assert not [m for m in handler.messages if "accelerate" in m], handler.messages
    assert "another diffusers warning" in handler.messages


# ------------------------------------------------------------------------------ DataLoader workers


def test_the_default_worker_count_is_what_the_machine_has(monkeypatch):
    from dit.data.workers import MAX_DEFAULT_WORKERS, default_num_workers, resolve_num_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 1), (2, 2), (3, 3), (4, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert default_num_workers() == expected, cpus
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: the node's CPUs shared among its ranks
    assert default_num_workers() == 2
    assert resolve_num_workers(None) == 2 and resolve_num_workers(0) == 0 and resolve_num_workers(7) == 7
    assert MAX_DEFAULT_WORKERS == 4


def test_the_configs_leave_the_count_to_the_machine_unless_set():
    assert compose_config("train", ["data=imagefolder"]).data.num_workers is None
    assert compose_config("train", ["data=latents"]).data.num_workers is None
    assert compose_config("train", ["data=imagefolder", "data.num_workers=3"]).data.num_workers == 3
    assert compose_config("train", ["data=toy"]).data.num_workers == 0  # in memory already: no workers
    assert train_config(["data=imagefolder", "data.root=/d", "name=n"]).data.num_workers is None
    assert compose_config("cache_latents", []).num_workers is None
    assert cache_cli.CacheLatentsConfig().num_workers is None and CacheRun().num_workers is None


class _Items(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i

    def set_epoch(self, epoch):
        pass


def test_the_data_stream_starts_the_machines_count_without_torchs_warning(monkeypatch):
    """torch warns when a DataLoader has more workers than the CPUs it may use: the default never
    does, and the batches are those of an explicit count (each item's randomness is its own)."""
    from dit.data.workers import default_num_workers

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    stream = DataStream(_Items(), env, global_batch=4, seed=0, num_workers=None)
    assert stream.num_workers == default_num_workers() <= len(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = stream.batches(0)
        got = [next(batches)[0] for _ in range(3)]
        batches.close()
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    explicit = DataStream(_Items(), env, global_batch=4, seed=0, num_workers=0)
    assert explicit.num_workers == 0
    batches = explicit.batches(0)
    assert all(torch.equal(a, next(batches)[0]) for a in got)
    batches.close()


def test_a_relaunch_with_another_core_count_resumes_the_same_run():
    """data.num_workers is recorded as given (null: the machine's) and is one of the keys a
    resumed run may change, and it is left out of sweep job folder names: a relaunch on a
    machine with other cores finds and resumes the same run (a run recorded with 4 included)."""
    saved, now = {"data": {"num_workers": 4, "root": "d"}}, {"data": {"num_workers": None, "root": "d"}}
    assert config_mismatches(saved, now) == []
    assert job_dirname(["data.num_workers=2", "seed=1"]) == job_dirname(["seed=1"])
