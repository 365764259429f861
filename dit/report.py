"""`python -m dit.report RUN_OR_SWEEP_DIR ...`: the program lives in dit/cli/report.py."""

from dit.cli.report import run

if __name__ == "__main__":
    run()
