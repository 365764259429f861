"""`dit-sample` and `python sample.py`: compose the sampling config, run `dit.sampling.generate.generate`.

The docstring of the repository's sample.py has the commands; this module is what they run.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dit.cli.errors import hydra_program
from dit.sampling.generate import generate


def sample(cfg: DictConfig) -> None:
    """The work: a PNG grid or an ADM .npz, as `cfg.mode` says."""
    generate(cfg)


# main: the hydra entry; run: the program (one-line errors, dit/cli/errors.py). No autograd anywhere.
main, run = hydra_program("sample", sample, setup=lambda: torch.set_grad_enabled(False))
