"""`python -m dit.toy ...`: the toy data sets live in dit/data/toy.py (with this program, `main`)."""

from dit.data.toy import main

if __name__ == "__main__":
    main()
