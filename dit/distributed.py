"""torch.distributed plumbing: one code path for a single process, `torchrun`, and SLURM tasks
started by submitit; DDP or FSDP2 wrapping; full (official-layout) state dicts from either.

    env = init_distributed("auto")        # reads RANK / WORLD_SIZE / LOCAL_RANK (or submitit's)
    model = wrap_model(model, env, Parallel.ddp)
    ...
    cleanup(env)

Single process (no RANK in the environment): no process group is created and every collective
helper here is a no-op, so library code never branches on "am I distributed".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _submitit_env() -> Optional[Any]:
    """submitit's job environment when running as a submitit task (SLURM or local), else None."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    return submitit.JobEnvironment()


def env_rank() -> int:
    """The global rank announced by the launcher (torchrun's RANK or the submitit task rank),
    0 for a plain process. Needs no process group, so logging and hydra can use it early."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    job = _submitit_env()
    return job.global_rank if job is not None else 0


class RankZeroFilter(logging.Filter):
    """Logging filter: everything on global rank 0; on other ranks only records at or above
    `other_ranks_level` (None: nothing). Used by conf/hydra/job_logging/rank_zero.yaml."""

    def __init__(self, other_ranks_level: Optional[str] = "WARNING"):
        super().__init__()
        self.other_ranks_level = None if other_ranks_level is None else logging.getLevelName(other_ranks_level)

    def filter(self, record: logging.LogRecord) -> bool:
        if env_rank() == 0:
            return True
        return self.other_ranks_level is not None and record.levelno >= self.other_ranks_level


def _export_submitit_env() -> None:
    """Inside a submitit task with several tasks, export MASTER_ADDR/PORT, RANK, WORLD_SIZE and
    LOCAL_RANK so that `init_process_group("env://")` works as under torchrun. CUDA_VISIBLE_DEVICES
    is left alone: the device is chosen from LOCAL_RANK, as under torchrun."""
    job = _submitit_env()
    if job is None or "RANK" in os.environ or job.num_tasks <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Set up this process: its device, and the process group when there are several ranks
    (NCCL for CUDA, gloo for CPU). `device`: "auto" (cuda:LOCAL_RANK if CUDA is available,
    else cpu), "cpu", "cuda" (cuda:LOCAL_RANK) or an explicit "cuda:N"."""
    _export_submitit_env()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} but CUDA is not available: use device=cpu")
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank_zero(work: Callable[[], T], env: DistEnv, failure: Callable[[str], BaseException]) -> Optional[T]:
    """Run `work` on rank 0 alone and share its outcome, so that no rank waits at a later
    collective for a rank that has already failed: returns `work()`'s result on rank 0 (None on
    the other ranks, which receive what they need by a `broadcast_object` of their own). If
    `work` raises on rank 0, rank 0 re-raises that very error and every other rank raises
    `failure("<ErrorType>: <message>")` (e.g. a ConfigError naming what rank 0 could not do).
    Collective: every rank must call it."""
    result, error = None, None
    if env.is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", env)
    if error is not None:
        raise error
    if failed is not None:
        raise failure(failed)
    return result


def gather_objects(obj: Any, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` is unchanged)."""
    t = t.clone()
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: each transformer block is its own unit (all-gathered just before use, freed after),
    then the root module holds the embedders and the final layer. In place; returns `model`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP gathers the root's parameters around `__call__` only; samplers call this method.
    if hasattr(model, "forward_with_cfg"):
        register_fsdp_forward_method(model, "forward_with_cfg")
    return model


def reshard(model: nn.Module) -> None:
    """Put an FSDP2 model's parameters back into their sharded form. A forward pass without a
    backward (sampling) leaves the root's parameters gathered; no-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def wrap_model(model: nn.Module, env: DistEnv, parallel: str) -> nn.Module:
    """The module to call in the training step: the model itself (one rank), DDP around it, or the
    model sharded in place with FSDP2 (`parallel` "ddp" or "fsdp"). The unwrapped module stays
    the owner of the parameters and of the official state-dict keys."""
    if not env.distributed:
        return model
    if parallel == "fsdp":
        return shard_model(model, env)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)


# --------------------------------------------------------------------------------------
# Full state dicts (official layout) under any wrapping
# --------------------------------------------------------------------------------------


def _sd_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on CPU, on rank 0 (other ranks get an empty dict under FSDP).
    A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_sd_options(cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names (not positions), unsharded, on CPU, so
    that it loads under DDP or FSDP alike. A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_sd_options(cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`; every rank passes the same full state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_sd_options())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective); any other tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
