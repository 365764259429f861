"""Command-line overrides rewritten before hydra reads them, so users can type what they mean:
official model names with a slash, and a VAE directory or hub id as `vae=...`. train.py,
sample.py and eval_fid.py all pass `sys.argv` through `flatten_model_overrides`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dit.config.run_keys import NOT_IN_JOB_NAME
from dit.config.schema import ConfigError

# The option files of the `vae` group (conf/vae/*.yaml): pixel, sd-ema, sd-mse, local.
VAE_OPTIONS_DIR = Path(__file__).resolve().parents[2] / "conf" / "vae"
_OFFICIAL_NAME = re.compile(r"\bDiT-(\w+)/(\d+)\b")


def flatten_model_overrides(args: list[str]) -> list[str]:
    """`model=DiT-XL/2` -> `model=DiT-XL-2` in command-line overrides, and `vae=DIR` ->
    `vae=local vae.name=DIR` (see `vae_overrides`).

    Hydra reads a slash in an option as a sub-folder, and sweep directories named after such a
    value would nest; the option files are therefore named `DiT-XL-2.yaml` (each holds the
    official `name: DiT-XL/2`). This lets users type the official names anyway, including in
    sweeps (`model=DiT-S/2,DiT-B/2`)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "model":
            arg = key + "=" + _OFFICIAL_NAME.sub(r"DiT-\1-\2", value)
        out.append(arg)
    return vae_overrides(out)


def vae_overrides(args: list[str], options_dir: Path = VAE_OPTIONS_DIR) -> list[str]:
    """`vae=X`, X not an option of the `vae` group (a `save_pretrained` directory or a hub id),
    becomes `vae=local vae.name=X`: the autoencoder loader decides what X is. `vae=null` becomes
    `~vae` (no choice: sample.py then uses the checkpoint's autoencoder). Options, sweeps over
    options (`vae=sd-ema,sd-mse`) and every other argument are left as they are."""
    options = {p.stem for p in options_dir.glob("*.yaml")}
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key != "vae" or all(v in options for v in value.split(",")):
            out.append(arg)
        elif value == "null":
            out.append("~vae")
        else:
            out += ["vae=local", f"vae.name={value}"]
    return out


# --------------------------------------------------------------------------------------
# Sweep job directories and run names (conf/train.yaml's hydra.sweep.subdir and `name`)
# --------------------------------------------------------------------------------------

_MAX_DIRNAME = 180  # bytes; file systems allow 255


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _left_out(key: str) -> bool:
    """Whether `key` is left out of job directory names (it or a parent is in NOT_IN_JOB_NAME)."""
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NOT_IN_JOB_NAME)


def job_dirname(task_overrides) -> str:
    """A sweep job's directory name from its command-line overrides: `key=value` pairs, sorted,
    joined with `,` (hydra's override_dirname, without the keys that do not define a run:
    `dit.config.run_keys.NOT_IN_JOB_NAME`), `/` in values written as
    `%2F` so a path never nests directories. The same overrides give the same name, whatever
    their order, so relaunching a sweep resumes each job in its own directory. Too long a name is
    cut and ends with a hash of the whole. No run-defining override: `default`."""
    kept = [item.replace("/", "%2F") for item in task_overrides if not _left_out(_key(item))]
    name = ",".join(sorted(kept)) or "default"
    if len(name.encode()) > _MAX_DIRNAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[: _MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest
    return name


def check_distinct_job_dirs(jobs: list[list[str]], sweep_dir: str) -> None:
    """Refuse a sweep two of whose jobs (each a list of overrides, in sweep order) get the same
    directory under `sweep_dir`: ConfigError naming the jobs, the folder, the keys that are left
    out of directory names and the fix.

    The keys of NOT_IN_JOB_NAME stay out of the names on purpose (a relaunch that changes them
    resumes the same job), so a sweep over one of them (`optim.grad_accum_steps=1,2`) would run
    its jobs one after another in one directory: the second resumes the first's finished run,
    does nothing and rewrites its record. Repeated values (`seed=1,1`) collide the same way."""
    groups: dict[str, list[list[str]]] = {}
    for job in jobs:
        groups.setdefault(job_dirname(job), []).append(job)
    shared = [(name, group) for name, group in groups.items() if len(group) > 1]
    if not shared:
        return
    name, group = shared[0]
    common = set(group[0]).intersection(*group[1:])
    differing = [[o for o in job if o not in common] for job in group]
    keys = list(dict.fromkeys(_key(o) for job in differing for o in job))
    shown = [" ".join(d) for d in differing[:4]] + ([f"{len(group) - 4} more"] if len(group) > 4 else [])
    shown = ", ".join(shown[:-1]) + " and " + shown[-1]
    where = f"{sweep_dir.rstrip('/')}/{name}" + (f" (and {len(shared) - 1} other folder(s) likewise)"
                                                 if len(shared) > 1 else "")
    left_out = [k for k in keys if _left_out(k)]
    if not keys:
        raise ConfigError(f"sweep refused before any job started: {len(group)} of its jobs are the same job "
                          f"({name}) and would run in one folder, {where}: list each value once")
    if left_out:
        why = (f"{', '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} left out of job folder names "
               f"(a relaunch may change {'it' if len(left_out) == 1 else 'them'} and resume the same job; "
               "dit/config/run_keys.py NOT_IN_JOB_NAME)")
    else:
        why = "their folder names coincide"
    raise ConfigError(
        f"sweep refused before any job started: its jobs {shown} would run in one folder, "
        f"{where}, because {why}: sweep {', '.join(keys)} in separate launches, each with its own "
        "hydra.sweep.dir=..., or train each value as its own run (without -m) with its own name=...")


def sweep_jobs(hydra_cfg, config_loader=None) -> list[list[str]] | None:
    """The override lists of a multirun's jobs, as hydra's basic sweeper will expand them from
    the composed config's `hydra` node (its `sweeper.params` and the command line's task
    overrides), or None when the sweeper is another one (such sweepers choose their jobs as
    they go)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    sweeper = OmegaConf.to_container(hydra_cfg.sweeper, resolve=False)
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    # As BasicSweeper.sweep: the config's params first, then the command line's overrides.
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args += OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


JOB_DIRNAME_SUBDIR = "${dit_job_dirname:}"  # conf/train.yaml's hydra.sweep.subdir


def check_sweep(hydra_cfg, config_loader=None) -> None:
    """`check_distinct_job_dirs` for a multirun about to start (the composed config's `hydra`
    node): run when its job directories are named by `job_dirname` (conf/train.yaml's
    hydra.sweep.subdir, unless the command line chose another) and hydra's basic sweeper
    expands it, so that every job is known before the first starts."""
    from omegaconf import OmegaConf

    if OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir") != JOB_DIRNAME_SUBDIR:
        return
    jobs = sweep_jobs(hydra_cfg, config_loader)
    if jobs is not None:
        check_distinct_job_dirs(jobs, str(hydra_cfg.sweep.dir))


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def run_name(base: str) -> str:
    """`name`'s default: `base` (`<model>_<data>`) for a single run; in a sweep (`-m`) the job's
    overrides are added (`DiT-S-2_toy/optim.lr=1e-4`), so each job's wandb run shows what it sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return base
    return f"{base}/{job_dirname(_task_overrides())}"


def register_resolvers() -> None:
    """`${dit_job_dirname:}` and `${dit_run_name:BASE}` for conf/train.yaml (see the functions)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("dit_job_dirname"):
        OmegaConf.register_new_resolver("dit_job_dirname", lambda: job_dirname(_task_overrides()))
    if not OmegaConf.has_resolver("dit_run_name"):
        OmegaConf.register_new_resolver("dit_run_name", run_name)
