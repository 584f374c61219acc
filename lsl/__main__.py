"""`python -m lsl` runs the same entry point as the `lsl` script."""

from lsl.cli import main

if __name__ == "__main__":
    main()
