"""The command-line programs: one module per program, each a hydra `main` plus the `run()` that
a console script (`dit-train`, ...) and the repository's top-level script (`python train.py`) call.

    train.py          dit-train           dit/cli/train.py
    sample.py         dit-sample          dit/cli/sample.py
    eval_fid.py       dit-eval            dit/cli/eval_fid.py
    python -m dit.cache_latents   dit-cache-latents   dit/cli/cache_latents.py
    python -m dit.export          dit-export          dit/cli/export.py  (argparse: main() returns the exit status)

Where hydra finds the configs (`config_dir`): the YAML files are written and edited in the
repository's top-level `conf/`. `pip install .` copies that folder into the installed package as
`dit/conf` (pyproject.toml maps the package `dit.conf` onto `conf/`), because an installed
package cannot reach a folder beside it. A checkout, and an editable install (which imports `dit`
from the checkout), have no `dit/conf` and read `conf/` itself, so an edit there is seen at once.
An absolute directory is what `hydra.main(config_path=...)` takes for both.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The absolute path of the hydra config directory (see the module docstring)."""
    package = Path(__file__).resolve().parent.parent  # the dit package
    for candidate in (package / "conf", package.parent / "conf"):  # installed copy, else the checkout's
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no hydra configs found: neither {package / 'conf'} (an installed dit) nor {package.parent / 'conf'} "
        "(a checkout) holds train.yaml; reinstall with `pip install .` from a checkout of the repository"
    )
