"""`dit-train` and `python train.py`: compose the training config, run `dit.train.run_training`.

The docstring of the repository's train.py has the commands; this module is what they run.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from dit.preemption import guard_start_up

# The console script `dit-train` imports this module first: the preemption signals are handled
# from here on, before torch and the library are imported (dit/preemption.py). `python train.py`
# guards them in its own first lines; a test importing this module changes no handler.
if os.path.basename(sys.argv[0]) == "dit-train":
    guard_start_up()

import hydra  # noqa: E402 - after the guard, as everything below
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dit.cli import config_dir
from dit.cli.errors import error_message, full_error_requested, reports_errors, run_program
from dit.config import ConfigError, flatten_model_overrides, register_configs, to_train_config
from dit.config.keys import check_known_keys
from dit.config.overrides import check_sweep
from dit.distributed import env_rank
from dit.io.atomic import write_text_atomic
from dit.cli.runtime import tune_host_allocator
from dit.train import run_training
from dit.train.faults import NonFiniteTrainingError
from dit.train.lock import RunDirectoryBusy

TRAINING_ERRORS = (RunDirectoryBusy, NonFiniteTrainingError)  # beside dit.cli.errors.KNOWN_ERRORS


def _write_hydra_files(out_dir: Path, cfg: DictConfig) -> None:
    """hydra's `.hydra/{config,hydra,overrides}.yaml`, written by us once the run is accepted
    (conf/train.yaml sets hydra.output_subdir=null): a launch refused for a config mismatch or a
    busy run directory leaves the run's record as it was. Each file is replaced atomically."""
    hydra_cfg = HydraConfig.get()
    files = {"config.yaml": OmegaConf.to_yaml(cfg),
             "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
             "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task)))}
    for name, text in files.items():
        write_text_atomic(out_dir / ".hydra" / name, text)


class SweepJobDirs(Callback):
    """conf/train.yaml's `hydra.callbacks.sweep_job_dirs`: a sweep (`-m`) two of whose jobs would
    share one job directory (a sweep over a key left out of directory names, such as
    `optim.grad_accum_steps=1,2`) is refused before any job starts, in one error line, exit 1
    (dit.config.overrides.check_distinct_job_dirs). So is a sweep whose config holds a key that
    is not in the schema (`-m +max_step=100 seed=1,2`: dit.config.keys.check_known_keys).

    Why a callback: `on_multirun_start` receives the composed config (the command line, the
    sweeper's `params`, the chosen `hydra.sweep.subdir`) before the sweeper expands the sweep,
    creates the sweep directory or writes `multirun.yaml`, and with hydra's basic sweeper, which
    is what every launcher (local, slurm) is handed, every job's overrides follow from it. hydra
    turns a callback's exception into a warning, so the refusal ends the program itself, as
    `reports_errors` does for a single run (SystemExit passes through hydra)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
        try:
            check_known_keys(config)
            check_sweep(config.hydra, loader)
        except ConfigError as err:
            if full_error_requested():
                traceback.print_exc()
            print(error_message(err), file=sys.stderr, flush=True)
            raise SystemExit(1) from None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@reports_errors(*TRAINING_ERRORS)  # one line for known failures (dit/cli/errors.py)
def main(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    return run_training(to_train_config(cfg), out_dir=out_dir, on_start=lambda: _write_hydra_files(out_dir, cfg))


def run() -> None:
    """The program: what `python train.py ...` and `dit-train ...` do."""
    run_program(_program, *TRAINING_ERRORS)


def _program() -> None:
    tune_host_allocator()  # reuse freed host memory: no page faults per step (dit/cli/runtime.py)
    register_configs()
    sys.argv = flatten_model_overrides(sys.argv)
    if env_rank() != 0:
        # Under torchrun every rank composes the same config; only rank 0 writes hydra's files.
        sys.argv.append("hydra.output_subdir=null")
    main()
