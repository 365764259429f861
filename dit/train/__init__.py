"""Training, one concept per module (the map: docs/design.md):

- `step`: one optimizer step as a function (`train_step`), label dropout;
- `ema`, `optimizer`: the EMA of the weights, AdamW;
- `randomness`: the per-step and per-rank random streams, RNG states;
- `stream`: the data set, this rank's batches from any step, the latent space;
- `lock`: one training run per run directory;
- `resume`: run-directory checkpoints and exact resume;
- `faults`: preemption, non-finite steps, fault injection;
- `report`: metrics file, wandb, progress bar, sample grids;
- `trainer`: builds a run from its config and runs the loop (`run_training`).
"""

from dit.train.ema import EMA
from dit.train.optimizer import build_optimizer
from dit.train.step import train_step
from dit.train.trainer import run_training

__all__ = ["EMA", "build_optimizer", "run_training", "train_step"]
