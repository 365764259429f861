"""Sample from a DiT checkpoint: a PNG grid, or N images to an ADM `.npz` for FID.

    python sample.py checkpoint=DiT-XL-2-256x256.pt                       # demo grid, cfg 4.0
    torchrun --nproc_per_node=8 sample.py checkpoint=... mode=bulk        # FID-50K protocol
    python sample.py checkpoint=... mode=bulk sampler=dpm++ sampler.num_steps=20 bulk.num_samples=5000
    python sample.py checkpoint=... vae=sd-mse                            # or vae=/path/to/vae_dir

Every option, its type and its default: dit/config/sample.py (SampleConfig); conf/sample.yaml
chooses the groups. The work is done by dit/generate.py.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from dit.config import flatten_model_overrides, register_configs
from dit.generate import generate
from dit.runtime import tune_host_allocator

register_configs()  # before hydra composes conf/sample.yaml, also when this file is imported


@hydra.main(config_path="conf", config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/runtime.py)
    torch.set_grad_enabled(False)
    sys.argv = flatten_model_overrides(sys.argv)
    main()
