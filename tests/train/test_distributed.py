"""`torchrun --nproc_per_node=2 train.py` on CPU (gloo): DDP and FSDP2 give the parameters of a
single process with the same global batch; the ranks share one run directory and only rank 0
writes to it."""

import logging

import pytest
import torch
import dit.distributed
from dit.distributed import DistEnv, RankZeroFilter, env_rank, on_rank_zero

from conftest import TINY_RUN, assert_same_parameters, torchrun_train, train_single_process

# 3 steps of a 2-block DiT, global batch 8 (4 per rank), on the toy set in pixel space.
ARGS = [*TINY_RUN, "name=d"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, the whole global batch."""
    return train_single_process(ARGS, tmp_path_factory.mktemp("single"))


def test_rank_zero_filter(monkeypatch):
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "m", None, None)
    monkeypatch.setenv("RANK", "0")
    assert env_rank() == 0 and RankZeroFilter("WARNING").filter(info) and RankZeroFilter(None).filter(info)
    monkeypatch.setenv("RANK", "1")
    assert env_rank() == 1
    assert not RankZeroFilter("WARNING").filter(info) and RankZeroFilter("WARNING").filter(warning)
    assert not RankZeroFilter(None).filter(warning)  # the log file: rank 0 only


def test_on_rank_zero_runs_the_work_on_rank_zero_only_and_every_rank_raises_its_error(monkeypatch):
    cpu = torch.device("cpu")
    calls = []
    assert on_rank_zero(lambda: calls.append(0) or "result", DistEnv(0, 0, 1, cpu), RuntimeError) == "result"
    assert calls == [0]
    error = ValueError("bad file")

    def fail():
        raise error

    with pytest.raises(ValueError) as raised:  # rank 0 re-raises the very error
        on_rank_zero(fail, DistEnv(0, 0, 1, cpu), RuntimeError)
    assert raised.value is error
    # Another rank: does no work and raises `failure` with what rank 0 broadcast.
    sent = []
    monkeypatch.setattr(dit.distributed, "broadcast_object", lambda obj, env: sent.append(obj) or "ValueError: bad file")
    with pytest.raises(KeyError, match="ValueError: bad file"):
        on_rank_zero(lambda: calls.append(1), DistEnv(1, 1, 2, cpu), KeyError)
    assert calls == [0] and sent == [None]  # rank 1 sent no error of its own
    monkeypatch.setattr(dit.distributed, "broadcast_object", lambda obj, env: None)
    assert on_rank_zero(lambda: calls.append(1), DistEnv(1, 1, 2, cpu), KeyError) is None and calls == [0]


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process_and_ranks_share_rank0s_run_dir(tmp_path, single_process):
    # A run directory with microseconds in its name: each rank's hydra resolves a different one.
    # Rank 0's is broadcast and used by all; rank 1's stays empty.
    proc = torchrun_train([*ARGS, f"hydra.run.dir={tmp_path}/run_${{now:%H%M%S%f}}"], tmp_path)
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
    torchrun_train([*ARGS, *grid, "parallel=fsdp", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["config"]["parallel"] == "fsdp" and len(ckpt["rng"]["ranks"]) == 2
    assert_same_parameters(single_process, ckpt)
    assert (tmp_path / "run" / "samples" / "0000002.png").is_file()
