"""Train a DiT. The same command runs as one process or under torchrun / SLURM:

    python train.py model=DiT-S/2 data=toy vae=pixel                          # one process
    torchrun --nproc_per_node=8 train.py experiment=DiT-XL-2-256 data.root=...  # one node
    python train.py -m hydra/launcher=slurm hydra.launcher.nodes=4 experiment=DiT-XL-2-256 ...

Relaunching a command continues its run from the newest checkpoint in its run directory
(outputs/<name>). The options, their defaults and the recipes: docs/training.md, dit/config/schema.py
and conf/.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dit.config import flatten_model_overrides, register_configs, to_train_config
from dit.distributed import env_rank
from dit.runtime import tune_host_allocator
from dit.train import run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    return run_training(to_train_config(cfg), out_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/runtime.py)
    register_configs()
    sys.argv = flatten_model_overrides(sys.argv)
    if env_rank() != 0:
        # Under torchrun every rank composes the same config; only rank 0 writes hydra's files.
        sys.argv.append("hydra.output_subdir=null")
    main()
