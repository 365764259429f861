"""`python -m dit.latent_stats ...`: the program lives in dit/cli/latent_stats.py."""

from dit.cli.latent_stats import main

if __name__ == "__main__":
    main()
