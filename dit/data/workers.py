"""How many DataLoader worker processes load the data when the config leaves it to the machine.

`data.num_workers` (train.py, data=imagefolder and data=latents) and `num_workers`
(`python -m dit.cache_latents`) default to null: `default_num_workers()`, at most
MAX_DEFAULT_WORKERS per process and never more than the CPUs this process may run on
(`os.sched_getaffinity`: what a SLURM allocation or `taskset` grants, not the whole node), shared
among the ranks of the node (LOCAL_WORLD_SIZE under torchrun). A number set on the command line is
used as it is. The count changes how fast the data arrives, never which data: every item's
randomness is a function of (seed, epoch, index) alone (dit/data/seeds.py), so a run, or its
relaunch on a machine with another number of cores, sees the same batches.
"""

from __future__ import annotations

import os
from typing import Optional

MAX_DEFAULT_WORKERS = 4  # beyond this, decoding is rarely what a training step waits for


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def default_num_workers(local_world_size: Optional[int] = None) -> int:
    """min(MAX_DEFAULT_WORKERS, this process's share of the usable CPUs), at least 1."""
    ranks = local_world_size if local_world_size is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return min(MAX_DEFAULT_WORKERS, max(1, usable_cpus() // max(1, ranks)))


def resolve_num_workers(value: Optional[int]) -> int:
    """The configured number of workers: `value` when set, else `default_num_workers()`."""
    return default_num_workers() if value is None else value
