"""`dit-cache-latents`: the console script of `python -m dit.cache_latents` (dit/cache_latents.py,
which holds its schema, its hydra `main` and the work; kept there so that `-m dit.cache_latents`
keeps working)."""

from __future__ import annotations

from dit.cache_latents import main
from dit.cli.errors import run_program


def run() -> None:
    """The program: what `python -m dit.cache_latents ...` and `dit-cache-latents ...` do."""
    run_program(main)  # known failures in one line (dit/cli/errors.py)
