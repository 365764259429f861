"""Sweeps (`train.py -m`): one directory per job named by its overrides, the same for the same
command, so a relaunch resumes every job; run names show the swept values; a refused relaunch
leaves a job's files as they were (docs/training.md, Sweeps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dit.config import job_dirname

from conftest import TINY_MODEL, run_script

TINY = ["data=toy", "data.num_per_class=4", *TINY_MODEL, "data.image_size=16", "data.num_workers=0",
        "log.samples.every=0", "global_batch_size=8", "log.every=1", "ckpt.every_minutes=null", "ckpt.every=2"]


def sweep(cwd: Path, *overrides: str) -> str:
    proc = run_script("train.py", ["-m", *TINY, *overrides], cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_job_dirnames_come_from_the_run_defining_overrides_in_any_order():
    a = job_dirname(["optim.lr=1e-4", "model=DiT-S-2", "max_steps=10", "data.root=/data/in/train", "log.every=5"])
    b = job_dirname(["data.root=/data/in/train", "model=DiT-S-2", "optim.lr=1e-4", "max_steps=99"])
    assert a == b == "data.root=%2Fdata%2Fin%2Ftrain,model=DiT-S-2,optim.lr=1e-4"
    assert job_dirname(["max_steps=3", "hydra/launcher=slurm", "hydra.launcher.nodes=2"]) == "default"
    long = job_dirname([f"model.depth={'9' * 300}"])
    assert len(long.encode()) <= 180 and long != job_dirname([f"model.depth={'9' * 299}"])


@pytest.mark.slow
def test_relaunching_a_sweep_resumes_every_job_in_directories_named_by_the_swept_values(tmp_path):
    sweep(tmp_path, "optim.lr=1e-3,2e-3", "max_steps=2")
    jobs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    # hydra writes the swept values as it parsed them: 1e-3 -> 0.001
    assert [("optim.lr=0.001" in p.name, "optim.lr=0.002" in p.name) for p in jobs] == [(True, False), (False, True)]
    for job in jobs:
        assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["0000002.pt"]
        saved = torch.load(job / "checkpoints" / "0000002.pt", weights_only=True)
        assert saved["config"]["name"] == f"DiT-S-4_toy/{job.name}"  # the run name (wandb's) shows the swept value

    out = sweep(tmp_path, "optim.lr=1e-3,2e-3", "max_steps=4")  # the same sweep, longer
    assert sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir()) == jobs
    assert out.count("resuming from") == 2, out[-2000:]
    for job in jobs:
        steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        assert sorted(p.name for p in (job / "checkpoints").iterdir())[-1] == "0000004.pt"


@pytest.mark.slow
def test_a_relaunch_refused_for_a_config_mismatch_leaves_the_runs_hydra_record_as_it_was(tmp_path):
    def train(*overrides):
        return run_script("train.py", [*TINY, "name=r", *overrides], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})

    assert train("max_steps=2").returncode == 0
    record = tmp_path / "outputs" / "r" / ".hydra"
    before = {p.name: p.read_bytes() for p in record.iterdir()}
    assert sorted(before) == ["config.yaml", "hydra.yaml", "overrides.yaml"] and b"max_steps=2" in before["overrides.yaml"]

    refused = train("max_steps=4", "optim.lr=0.5")
    assert refused.returncode != 0 and "different configuration" in refused.stdout + refused.stderr
    assert {p.name: p.read_bytes() for p in record.iterdir()} == before  # nothing of the run rewritten

    assert train("max_steps=4").returncode == 0  # an accepted relaunch records itself
    assert b"max_steps=4" in (record / "overrides.yaml").read_bytes()


def test_default_sample_names_of_two_runs_at_the_same_step_differ():
    from dit.sampling.loading import default_output_name
    from dit.sampling.settings import SamplerSettings

    settings = SamplerSettings(sampler="ddim", num_steps=20, cfg_scale=2.0)
    a, b = (default_output_name({"checkpoint": f"outputs/{run}/checkpoints/0002000.pt", "step": 2000}, settings,
                                seed=0) for run in ("lr1", "lr2"))
    assert a.startswith("lr1-0002000-ema-ddim20-cfg2") and b.startswith("lr2-0002000-") and a != b
    release = default_output_name({"checkpoint": "/w/DiT-XL-2-256x256.pt"}, settings, seed=0)
    assert release.startswith("DiT-XL-2-256x256-ema-ddim20")  # a release file keeps its own name
    job = "data=toy,model=DiT-S-4,optim.lr=0.001," + "x" * 100
    long = default_output_name({"checkpoint": f"multirun/{job}/checkpoints/0000004.pt"}, settings, seed=0)
    assert len(long) < 120 and long != default_output_name(
        {"checkpoint": f"multirun/{job}y/checkpoints/0000004.pt"}, settings, seed=0)
