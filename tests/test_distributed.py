"""`torchrun --nproc_per_node=2 train.py` on CPU (gloo): DDP and FSDP2 give the parameters of a
single process with the same global batch; the ranks share one run directory and only rank 0
writes to it."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit.distributed import RankZeroFilter, env_rank
from dit.train import run_training

from conftest import single_thread, train_config

REPO = Path(__file__).resolve().parents[1]
# 3 steps of a 2-block DiT, global batch 8 (4 per rank), on the toy set in pixel space.
ARGS = ["model=DiT-S/4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "vae=pixel", "data=toy",
        "data.num_per_class=4", "data.image_size=16", "global_batch_size=8", "max_steps=3", "log.every=1",
        "log.samples.every=0", "name=d"]


def torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, the whole global batch."""
    with single_thread():
        result = run_training(train_config(ARGS), tmp_path_factory.mktemp("single"))
    return torch.load(result["checkpoint"], weights_only=True)


def assert_same_parameters(reference, ckpt, rtol=1e-6):
    for part in ("model", "ema"):
        assert reference[part].keys() == ckpt[part].keys()
        for key, ref in reference[part].items():
            rel = (ckpt[part][key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel <= rtol, f"{part}.{key}: relative difference {rel:.2e}"
    trained = reference["model"]["final_layer.linear.weight"]
    assert trained.abs().max() > 0  # it trained: the zero-initialised output layer moved


def test_rank_zero_filter(monkeypatch):
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "m", None, None)
    monkeypatch.setenv("RANK", "0")
    assert env_rank() == 0 and RankZeroFilter("WARNING").filter(info) and RankZeroFilter(None).filter(info)
    monkeypatch.setenv("RANK", "1")
    assert env_rank() == 1
    assert not RankZeroFilter("WARNING").filter(info) and RankZeroFilter("WARNING").filter(warning)
    assert not RankZeroFilter(None).filter(warning)  # the log file: rank 0 only


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process_and_ranks_share_rank0s_run_dir(tmp_path, single_process):
    # A run directory with microseconds in its name: each rank's hydra resolves a different one.
    # Rank 0's is broadcast and used by all; rank 1's stays empty.
    proc = torchrun([*ARGS, f"hydra.run.dir={tmp_path}/run_${{now:%H%M%S%f}}"], tmp_path)
    dirs = [d for d in tmp_path.iterdir() if d.name.startswith("run_")]
    used = [d for d in dirs if any(d.iterdir())]
    assert len(dirs) == 2 and len(used) == 1, [list(d.iterdir()) for d in dirs]
    run = used[0]
    assert {p.name for p in run.iterdir()} == {".hydra", "checkpoints", "metrics.jsonl", "train.log"}
    assert (run / "train.log").read_text().count("model custom") == 1  # rank 0's log only
    assert "2 rank(s)" in proc.stdout
    assert_same_parameters(single_process, torch.load(run / "checkpoints" / "0000003.pt", weights_only=True))


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process(tmp_path, single_process):
    # With an EMA sample grid at step 2: the sharded EMA model samples on all ranks, then its
    # updates go on (sampling must leave it sharded); sampling does not change the weights.
    grid = ["log.samples.every=2", "log.samples.num_images=2", "log.samples.num_steps=2"]
    torchrun([*ARGS, *grid, "parallel=fsdp", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["config"]["parallel"] == "fsdp" and len(ckpt["rng"]["ranks"]) == 2
    assert_same_parameters(single_process, ckpt)
    assert (tmp_path / "run" / "samples" / "0000002.png").is_file()
