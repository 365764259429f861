"""`python -m dit.quickstart ...`: the program lives in dit/cli/quickstart.py."""

from dit.cli.quickstart import run

if __name__ == "__main__":
    run()
