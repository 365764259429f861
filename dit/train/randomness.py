"""Where every random number of a training run comes from.

Reproducibility is by construction rather than by saved RNG states:

- the data order of epoch e is a permutation seeded by (seed, e) (`DistributedResumableSampler`),
  and an item's augmentation (flip, posterior noise) is seeded by (seed, e, index);
- the diffusion timesteps (or a flow objective's continuous times), the noise and the
  label-dropout mask of step s are drawn for the whole *global* batch from a generator seeded
  by (seed, s); each rank takes its rows.

So a run resumed at step s sees exactly what the uninterrupted run saw, and the result does not
depend on how the global batch is split across ranks (up to floating-point summation order).
The processes' global RNGs are seeded per rank and saved in checkpoints anyway, for any code
that draws from them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from dit.data import item_seed

# Stream ids for `item_seed(seed, step, stream)`: far above any dataset index, so they never
# collide with the per-item streams of the datasets (seed, epoch, index).
STEP_STREAM = 1 << 62  # (seed, step): the step's timesteps, noise and label-dropout mask
GRID_STREAM = (1 << 62) + 1  # (seed, 0 | 1): the sample grids' noise and sampler noise
RANK_STREAM = (1 << 62) + (1 << 20)  # + rank, (seed, step): the rank's global RNGs
LOADER_STREAM = (1 << 62) + (1 << 40)  # + rank, (seed, epoch): DataLoader worker base seeds


@dataclass
class StepRandomness:
    """What one rank draws for its rows of the global batch of one step."""

    t: torch.Tensor  # (b,) diffusion timesteps in [0, T) (int64), or flow times in [0, 1] (float32)
    noise: torch.Tensor  # (b, C, H, W) diffusion / flow noise
    drop: torch.Tensor  # (b,) bool: replace the label by the null class (CFG training)
    posterior: Optional[torch.Tensor]  # (b, C, H, W) eps of the VAE posterior sample, or None


@dataclass(frozen=True)
class RandomnessSpec:
    """What every step of a run draws for its global batch: fixed for the run.

    num_timesteps: diffusion timesteps are drawn in [0, num_timesteps). sample_t(n, generator=g,
    device=device): continuous times of a flow objective (`FlowMatching.sample_t`), drawn first
    from the same generator in place of the integer timesteps (`num_timesteps` is then unused);
    None: diffusion timesteps, as always. posterior: also draw the eps of a VAE posterior sample."""

    seed: int
    global_batch: int
    shape: tuple  # (C, H, W) of one latent
    num_timesteps: Optional[int]
    drop_prob: float  # label dropout (classifier-free guidance training)
    posterior: bool = False
    sample_t: Optional[Callable[..., torch.Tensor]] = None


def step_randomness(spec: RandomnessSpec, step: int, rank: int, world_size: int,
                    device: torch.device) -> StepRandomness:
    """Draw the global batch's randomness of `step` from a generator seeded by (seed, step), then
    keep the rows of this rank: global positions rank, rank + W, ... (the sampler's assignment)."""
    g = torch.Generator(device=device).manual_seed(item_seed(spec.seed, step, STEP_STREAM))
    n = spec.global_batch
    if spec.sample_t is None:
        t = torch.randint(0, spec.num_timesteps, (n,), generator=g, device=device)
    else:
        t = spec.sample_t(n, generator=g, device=device)
    noise = torch.randn((n, *spec.shape), generator=g, device=device)
    drop = torch.rand((n,), generator=g, device=device) < spec.drop_prob
    eps = torch.randn((n, *spec.shape), generator=g, device=device) if spec.posterior else None
    rows = slice(rank, None, world_size)
    return StepRandomness(t[rows], noise[rows], drop[rows], None if eps is None else eps[rows])


def rng_state(device: torch.device) -> dict:
    """This process's global RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"].tolist()), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_process(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_rank(seed: int, step: int, rank: int, world_size: int, device: torch.device, saved: list) -> None:
    """Restore this rank's global RNGs from a checkpoint's `saved` states (one per rank), or
    seed them from (seed, step, rank) when the checkpoint has none for this world size."""
    if len(saved) == world_size:
        set_rng_state(saved[rank], device)
    else:
        seed_process(item_seed(seed, step, RANK_STREAM + rank))
