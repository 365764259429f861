"""The data order: which items each rank sees, epoch by epoch, resumable in the middle of an
epoch (`DistributedResumableSampler`)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class DistributedResumableSampler(Sampler[int]):
    """The data order of one epoch, split across ranks, resumable mid-epoch.

    Epoch e's global order is a permutation of range(dataset_len) drawn from `seed + e` (or
    0..N-1 without shuffle), trimmed (drop_last) or wrapped around (otherwise) to a multiple of
    `num_replicas`. Rank r takes global positions r, r + W, r + 2W, ... (as torch's
    DistributedSampler). `start_index` is the number of positions of the global order already
    consumed (all ranks together, i.e. steps done this epoch x global batch): a resumed run sets
    it and gets exactly the remaining order, even with a different number of ranks.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if dataset_len <= 0:
            raise ValueError(f"cannot sample from an empty dataset (dataset_len={dataset_len})")
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(
                f"dataset of {dataset_len} items is smaller than the {num_replicas} ranks: "
                "use fewer ranks or drop_last=False"
            )
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        per_rank = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        self.total_size = per_rank * num_replicas
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.total_size:
            raise ValueError(f"start_index {start_index} is outside the epoch's {self.total_size} positions")
        if start_index % self.num_replicas:
            raise ValueError(
                f"start_index {start_index} is not a multiple of num_replicas {self.num_replicas}: "
                "ranks would get different numbers of samples; pass steps x global batch size"
            )
        self.epoch, self.start_index = int(epoch), int(start_index)

    def global_order(self) -> torch.Tensor:
        """The epoch's full order over all ranks, (total_size,) int64."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_len)
        if self.total_size > self.dataset_len:  # wrap around so every rank gets as many
            order = order.repeat(math.ceil(self.total_size / self.dataset_len))
        return order[: self.total_size]

    def __iter__(self):
        return iter(self.global_order()[self.start_index + self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.total_size - self.start_index) // self.num_replicas
