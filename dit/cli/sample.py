"""`dit-sample` and `python sample.py`: compose the sampling config, run `dit.generate.generate`.

The docstring of the repository's sample.py has the commands; this module is what they run.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from dit.cli import config_dir
from dit.cli.errors import reports_errors, run_program
from dit.config import flatten_model_overrides, register_configs
from dit.generate import generate
from dit.runtime import tune_host_allocator

register_configs()  # before hydra composes conf/sample.yaml, also when this file is imported


@hydra.main(config_path=config_dir(), config_name="sample", version_base=None)
@reports_errors()  # one line for known failures (dit/cli/errors.py)
def main(cfg: DictConfig) -> None:
    generate(cfg)


def run() -> None:
    """The program: what `python sample.py ...` and `dit-sample ...` do."""
    run_program(_program)


def _program() -> None:
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/runtime.py)
    torch.set_grad_enabled(False)
    sys.argv = flatten_model_overrides(sys.argv)
    main()
