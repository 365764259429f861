"""`python -m dit.export ...`: the program lives in dit/cli/export.py (`main`)."""

import sys

from dit.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
