"""Which randomness and which network batch each sample gets: per-sample seeds (noise and label
streams), labels, the index blocks that fix which samples share a forward pass, and how the
blocks are dealt to ranks. Re-exported by `dit.sampling`, which explains why (per-sample
determinism, byte-identical bulk files for any number of ranks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

LABEL_MODES = ("uniform", "balanced")
# Independent random streams per sample: its noise (initial and per step) and its label.
NOISE_STREAM, LABEL_STREAM = 0, 1


def sample_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed` (numpy's SeedSequence mixing, so
    neighbouring indices get unrelated streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (CPU, so its noise is the same whatever device samples it)."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """x_T: (N, *shape), row i drawn from generators[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, mode: str = "uniform") -> torch.Tensor:
    """Class labels for samples `indices`: "uniform" draws each independently (the reference
    protocol for FID-50K), "balanced" cycles through the classes (index mod num_classes)."""
    idx = [int(i) for i in indices]
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in idx], dtype=torch.long)
    if mode == "uniform":
        return torch.tensor(
            [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(sample_seed(seed, i, LABEL_STREAM))))
             for i in idx], dtype=torch.long)
    raise ValueError(f"unknown label mode {mode!r}: use one of {LABEL_MODES}")


# --------------------------------------------------------------------------------------
# Network batches and ranks
# --------------------------------------------------------------------------------------


def sample_blocks(indices: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Group sample indices into the network batches they are computed in: index i belongs to
    block i // batch_size, whoever computes it.

    Why blocks: floating-point kernels (CPU and GPU GEMMs) round differently for different batch
    shapes, so a sample's last bits depend on which samples share its forward passes. With the
    batch fixed by the index, a sample is computed identically on any rank, in any order, before
    or after a resume, so the bulk file is byte-identical for any number of ranks. (A different
    batch size regroups the samples and may change low bits; see docs/sampling.md.)"""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        return []
    keys = indices // batch_size
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [block for block in np.split(indices, cuts)]


def rank_indices(num_samples: int, batch_size: int, rank: int, world_size: int,
                 skip_blocks: set[int] | frozenset = frozenset()) -> np.ndarray:
    """The sample indices rank `rank` computes: whole blocks (`sample_blocks`), dealt round-robin
    over the blocks still to do (those not in `skip_blocks`)."""
    todo = [b for b in range(-(-num_samples // batch_size)) if b not in skip_blocks]
    mine = todo[rank::world_size]
    if not mine:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(b * batch_size, min((b + 1) * batch_size, num_samples)) for b in mine])
