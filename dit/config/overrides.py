"""Command-line overrides rewritten before hydra reads them, so users can type what they mean:
official model names with a slash, and a VAE directory or hub id as `vae=...`. train.py,
sample.py and eval_fid.py all pass `sys.argv` through `flatten_model_overrides`."""

from __future__ import annotations

import re
from pathlib import Path

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
