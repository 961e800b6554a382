"""`python -m m6lit ...` — the same entry point as the `m6lit` console script."""

from m6lit.cli import main

if __name__ == "__main__":
    main()
