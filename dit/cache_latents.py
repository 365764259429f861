"""`python -m dit.cache_latents ...`: the program lives in dit/cli/cache_latents.py."""

from dit.cli.cache_latents import run

if __name__ == "__main__":
    run()
