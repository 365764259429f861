"""How the programs fail: a known failure (a wrong config value, a missing or unusable file, a bad
checkpoint, missing weights, a run directory in use, a run that went non-finite) ends in one line
on stderr, `error: <what is wrong and how to fix it>`, and exit status 1 (a message that lists
things, such as the tensors a checkpoint lacks, has its list joined into that line). Everything else (a bug)
keeps its traceback, and so does a known failure when HYDRA_FULL_ERROR=1 is set. The failures
and their messages are listed in docs/training.md ("When something is wrong").

Two places catch, because hydra runs the task function inside its own error reporting, which
prints a trimmed traceback and then a hint line for any exception:

- `reports_errors` wraps the task function (under `@hydra.main`). In a single run a known failure
  prints its line and raises SystemExit(1), which hydra lets through untouched. In a sweep (`-m`)
  it prints the line and re-raises: hydra's launcher records the job as failed and runs the other
  jobs, then raises the first failure at the end (so a sweep still reports it and exits 1).
- `run_program` calls the hydra main with HYDRA_FULL_ERROR=1 set for the call, so hydra raises
  its own composition and override errors (and a sweep's recorded failure) instead of printing
  them; they become the same one line. The user's own HYDRA_FULL_ERROR=1 still means tracebacks.

A SystemExit (TrainingPreempted's status 75, a `--help`) is never caught. Under torchrun each rank
prints its own line.

Before the task runs, `reports_errors` refuses a key the program's schema does not have, added
with `+` or not (dit/config/keys.py: "unknown config key max_step: ... did you mean max_steps?");
hydra's own refusal of such a key, which advises the `+`, becomes the same line. When the task
fails, the run directory hydra created for it is removed if it is still empty (dit/cli/run_dir.py).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from dit.autoencoder import AutoencoderUnavailable
from dit.sampling.bulk import BulkOutputBusyError
from dit.cli import config_dir
from dit.config import ConfigError, flatten_model_overrides, register_configs
from dit.config.keys import check_known_keys, unknown_override
from dit.cli.run_dir import forget_new_folders, remove_unused_run_dir
from dit.data.images import BadImageError
from dit.data.latents import LatentCacheMismatch
from dit.io.atomic import FileWriteError
from dit.io.checkpoint import CheckpointError
from dit.scoring.inception import FeatureExtractorUnavailable
from dit.cli.runtime import tune_host_allocator
from dit.sampling.images import NonFiniteSamplesError

# Our own error types: whatever they say is meant for the user. OSError covers the user's paths
# (FileNotFoundError, NotADirectoryError, PermissionError, a full disk; FileWriteError and
# BadImageError are OSErrors too). A program adds its own (the training run's) to these.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, FileWriteError, BadImageError, LatentCacheMismatch, AutoencoderUnavailable,
    FeatureExtractorUnavailable, NonFiniteSamplesError, BulkOutputBusyError, OSError,
)
_PACKAGE = str(Path(__file__).resolve().parent.parent)  # the dit package's folder
_user_full_error: bool | None = None  # HYDRA_FULL_ERROR as the user set it (run_program records it)


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1, hydra's own switch)."""
    if _user_full_error is not None:
        return _user_full_error
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def _raised_in_dit(err: BaseException) -> bool:
    """Whether the innermost frame of the traceback is code of the dit package: a ValueError our
    checks raised (they name the key or file), not one from deep inside a library (a bug)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE + os.sep)


def is_known(err: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    if isinstance(err, SystemExit | KeyboardInterrupt):
        return False
    if isinstance(err, (*KNOWN_ERRORS, *extra, HydraException, OmegaConfBaseException)):
        return True
    return isinstance(err, ValueError) and _raised_in_dit(err)


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    """omegaconf's first line and the key (its message continues with full_key/object_type lines)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    key = getattr(err, "full_key", None)
    return f"{first} (key {key})" if key and str(key) not in first else first


def _hydra_line(err: HydraException) -> str:
    """hydra's first line, the options of a missing group choice, the omegaconf cause (a value of
    the wrong type, a key not in the schema), without the config search path."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    options = getattr(err, "options", None)
    if isinstance(err, MissingConfigException):  # the rest of its message: the options, the search path
        line = lines[0] + (f"; choose one of: {', '.join(options)}" if options else "")
    else:  # e.g. "Could not override 'x'." + "To append to your config use +x=1"
        line = " ".join(lines)
    if isinstance(err.__cause__, OmegaConfBaseException):
        line += f" ({_omegaconf_line(err.__cause__)})"
    return line


MAX_DETAIL_LINES = 10  # of a multi-line message on the error line; the rest are counted (HYDRA_FULL_ERROR=1 shows all)


def error_message(err: BaseException) -> str:
    """`error: ...`, one line: the message itself for config errors (ours, hydra's, omegaconf's:
    they name the key), `error: <type>: ...` for the rest. Our multi-line messages (a list of
    mismatched tensors, a config diff) are joined into that line with "; ", the last line (the
    fix) always kept, at most MAX_DETAIL_LINES of the list before it. hydra's refusal of a key
    that is not in the schema reads as ours, with the closest real keys (not hydra's advice to add
    it with `+`, which the program would refuse too)."""
    if isinstance(err, HydraException):
        err = unknown_override(err) or err
    if isinstance(err, HydraException):
        text = _hydra_line(err)
    elif isinstance(err, OmegaConfBaseException):
        text = _omegaconf_line(err)
    elif isinstance(err, ConfigError):
        text = str(err).strip() or type(err).__name__
    else:
        text = f"{type(err).__name__}: {str(err).strip()}"
    first, *rest = [line.strip() for line in text.splitlines() if line.strip()]
    if not rest:
        return f"error: {first}"
    *details, fix = rest
    if len(details) > MAX_DETAIL_LINES:
        hidden = len(details) - MAX_DETAIL_LINES
        details = [*details[:MAX_DETAIL_LINES], f"... and {hidden} more (HYDRA_FULL_ERROR=1 shows them)"]
    joined = "; ".join([*details, fix])
    return f"error: {first} {joined}" if first.endswith(":") else f"error: {first}; {joined}"


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def reports_errors(*extra: type[BaseException]) -> Callable:
    """Decorator of a hydra task function: the config's keys checked against its schema, then
    the task; a known failure ends the run in one line, and a failure leaves no empty run
    directory (see the module docstring; `extra`: the program's own error types)."""

    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def wrapped(cfg: Any) -> Any:
            try:
                try:
                    check_known_keys(cfg)
                    return task(cfg)
                except BaseException:
                    remove_unused_run_dir()
                    raise
                finally:
                    forget_new_folders()
            except Exception as err:
                if full_error_requested() or not is_known(err, extra):
                    raise
                print(error_message(err), file=sys.stderr, flush=True)
                if _in_sweep():
                    raise  # hydra records the job as failed and runs the others
                raise SystemExit(1) from None

        return wrapped

    return decorate


def run_program(main: Callable[[], Any], *extra: type[BaseException]) -> Any:
    """Call a hydra main (`@hydra.main` function, no arguments) so that hydra's own errors and a
    sweep's failure end in one line too (see the module docstring)."""
    global _user_full_error
    before = os.environ.get("HYDRA_FULL_ERROR")
    _user_full_error = full_error_requested()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # hydra raises instead of printing; we print below
    try:
        return main()
    except Exception as err:
        if _user_full_error or not is_known(err, extra):
            raise
        print(error_message(err), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
        _user_full_error = None


def hydra_program(config_name: str, task: Callable[[Any], Any], *extra: type[BaseException],
                  setup: Callable[[], None] | None = None) -> tuple[Callable[[], Any], Callable[[], None]]:
    """`(main, run)` of a program that composes conf/<config_name>.yaml and calls `task(cfg)`:
    `main` is the `@hydra.main` entry (its known failures in one line, `extra`: the program's own
    error types), `run` what the console script and the top-level script call: the host
    allocator tuned before anything is allocated, `setup()`, the `model=DiT-XL/2` overrides
    rewritten to the option files' names, then `main` through `run_program`. The schemas are
    registered now, so that hydra finds them however `main` is reached.

    hydra names the job after the module of `task` (it looks through the decorators), so a
    program passes a function of its own module: `sample`, `eval_fid`, as before."""
    register_configs()

    @hydra.main(config_path=config_dir(), config_name=config_name, version_base=None)
    @reports_errors(*extra)
    @functools.wraps(task)
    def main(cfg: Any) -> Any:
        return task(cfg)

    def program() -> None:
        tune_host_allocator()  # reuse freed host memory: no page faults per batch (dit/cli/runtime.py)
        if setup is not None:
            setup()
        sys.argv = flatten_model_overrides(sys.argv)
        main()

    def run() -> None:
        run_program(program, *extra)

    return main, run
