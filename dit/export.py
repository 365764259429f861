"""`python -m dit.export ...`: the program lives in dit/io/export.py (`main`)."""

import sys

from dit.io.export import main

if __name__ == "__main__":
    sys.exit(main())
