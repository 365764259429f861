"""`dit-eval` and `python eval_fid.py`: compose the scoring config, run
`dit.scoring.evaluate.generate_and_evaluate`.

The docstring of the repository's eval_fid.py has the commands; this module is what they run.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dit.cli.errors import hydra_program
from dit.scoring.evaluate import generate_and_evaluate


def eval_fid(cfg: DictConfig) -> None:
    """The work: score `cfg.samples`, or generate them from `cfg.checkpoint` first."""
    generate_and_evaluate(cfg)


# main: the hydra entry; run: the program (one-line errors, dit/cli/errors.py).
main, run = hydra_program("eval", eval_fid)
