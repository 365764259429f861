"""Command-line overrides rewritten before hydra reads them, so users can type what they mean:
official model names with a slash, and a VAE directory or hub id as `vae=...`. train.py,
sample.py and eval_fid.py all pass `sys.argv` through `flatten_model_overrides`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dit.config.run_keys import NOT_IN_JOB_NAME

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


def job_dirname(task_overrides) -> str:
    """A sweep job's directory name from its command-line overrides: `key=value` pairs, sorted,
    joined with `,` (hydra's override_dirname, without the keys that do not define a run:
    `dit.config.run_keys.NOT_IN_JOB_NAME`), `/` in values written as
    `%2F` so a path never nests directories. The same overrides give the same name, whatever
    their order, so relaunching a sweep resumes each job in its own directory. Too long a name is
    cut and ends with a hash of the whole. No run-defining override: `default`."""
    kept = []
    for item in task_overrides:
        key = item.partition("=")[0].lstrip("+~")
        if any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NOT_IN_JOB_NAME):
            continue
        kept.append(item.replace("/", "%2F"))
    name = ",".join(sorted(kept)) or "default"
    if len(name.encode()) > _MAX_DIRNAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[: _MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest
    return name


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
