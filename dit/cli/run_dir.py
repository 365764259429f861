"""A launch that fails before it wrote anything leaves no empty run directory behind.

hydra creates the job's directory (train.py: `outputs/<name>`, and `outputs/` itself on a fresh
checkout) before it calls the task, so a launch refused for a config error used to leave an
empty `outputs/<name>/`. `NewRunFolders` (conf/train.yaml `hydra.callbacks.new_run_folders`)
notes, before hydra creates them, which folders of the run directory do not exist yet;
`remove_unused_run_dir`, called by `dit.cli.errors.reports_errors` when the task fails, removes
those that are still empty, deepest first. A sweep's job folder, which hydra creates without a
callback in between, is removed when it is empty. Only empty folders are ever removed (`rmdir`):
a folder that holds anything, a real run's or another process's, stays as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

_new_folders: list[Path] = []  # of the coming run directory, deepest first (NewRunFolders)


def _missing_folders(run_dir: Path) -> list[Path]:
    """`run_dir` and its parents that do not exist, deepest first."""
    out = []
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        out.append(folder)
    return out


class NewRunFolders(Callback):
    """Notes the folders of a single run's directory that hydra is about to create (see the module
    docstring). `hydra.run.dir` is resolved as hydra resolves it next (`outputs/${name}`, whose
    default reads hydra's runtime choices)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _new_folders.clear()
        holder = HydraConfig.instance()
        before = holder.cfg
        try:
            holder.set_config(config)
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        except Exception:  # hydra will report what cannot be resolved; nothing to note
            return
        finally:
            holder.cfg = before
        _new_folders.extend(_missing_folders(run_dir))


def _remove_empty(folder: Path) -> bool:
    try:
        folder.rmdir()  # only an empty folder
    except OSError:  # not empty, gone already (another rank), not ours to remove
        return False
    return True


def remove_unused_run_dir() -> None:
    """After a failed task: remove the noted folders that are still empty (deepest first, stopping
    at the first that is not), and a sweep job's folder if it is empty. The note is used once."""
    noted, _new_folders[:] = list(_new_folders), []
    for folder in noted:
        if not _remove_empty(folder):
            break
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        if job_dir.resolve() != Path(os.getcwd()).resolve():
            _remove_empty(job_dir)


def forget_new_folders() -> None:
    """The task ran: the note is not used."""
    _new_folders.clear()
