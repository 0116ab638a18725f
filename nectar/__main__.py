"""`python -m nectar` starts the command-line interface."""

from nectar.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
