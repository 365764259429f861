"""`dit-train` and `python train.py`: compose the training config, run `dit.train.run_training`.

The docstring of the repository's train.py has the commands; this module is what they run.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dit.cli import config_dir
from dit.config import flatten_model_overrides, register_configs, to_train_config
from dit.distributed import env_rank
from dit.runtime import tune_host_allocator
from dit.train import run_training


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> dict:
    return run_training(to_train_config(cfg), out_dir=HydraConfig.get().runtime.output_dir)


def run() -> None:
    """The program: what `python train.py ...` and `dit-train ...` do."""
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/runtime.py)
    register_configs()
    sys.argv = flatten_model_overrides(sys.argv)
    if env_rank() != 0:
        # Under torchrun every rank composes the same config; only rank 0 writes hydra's files.
        sys.argv.append("hydra.output_subdir=null")
    main()
