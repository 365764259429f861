"""`dit-cache-latents`: the console script of `python -m dit.cache_latents` (dit/cache_latents.py,
which holds its schema, its hydra `main` and the work; kept there so that `-m dit.cache_latents`
keeps working)."""

from __future__ import annotations

from dit.cache_latents import main


def run() -> None:
    """The program: what `python -m dit.cache_latents ...` and `dit-cache-latents ...` do."""
    main()
