"""`dit-eval` and `python eval_fid.py`: compose the scoring config, run
`dit.evaluate.generate_and_evaluate`.

The docstring of the repository's eval_fid.py has the commands; this module is what they run.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dit.cli import config_dir
from dit.cli.errors import reports_errors, run_program
from dit.config import flatten_model_overrides, register_configs
from dit.evaluate import generate_and_evaluate
from dit.runtime import tune_host_allocator

register_configs()  # before hydra composes conf/eval.yaml, also when this file is imported


@hydra.main(config_path=config_dir(), config_name="eval", version_base=None)
@reports_errors()  # one line for known failures (dit/cli/errors.py)
def main(cfg: DictConfig) -> None:
    generate_and_evaluate(cfg)


def run() -> None:
    """The program: what `python eval_fid.py ...` and `dit-eval ...` do."""
    run_program(_program)


def _program() -> None:
    tune_host_allocator()  # reuse freed host memory: no page faults per batch (dit/runtime.py)
    sys.argv = flatten_model_overrides(sys.argv)
    main()
