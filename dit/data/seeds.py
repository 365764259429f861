"""Per-item randomness: every random choice the data layer makes for one item (the horizontal
flip, the posterior noise of a cached latent) comes from a generator seeded by a hash of
(seed, epoch, index).

Such a seed depends on nothing else: not on a global RNG, not on which DataLoader worker loads
the item, not on what was loaded before. So a resumed run, or a run with another number of
workers, draws exactly the same augmentation for every item.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item of one epoch. Hashing (rather than e.g. seed + index) keeps the
    streams of neighbouring items and epochs unrelated."""
    h = 0
    for value in (seed, epoch, index):
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h >> 1


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded with `item_seed(seed, epoch, index)`."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def draw_flip(generator: torch.Generator) -> bool:
    """The item's mirror coin: the first draw from its generator, shared by the image and the
    latents pipelines so that both flip the same items."""
    return bool(torch.randint(0, 2, (1,), generator=generator).item())
