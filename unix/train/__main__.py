"""`python -m unix.train CONFIG.yaml [key=value ...]`: the entry point for torchrun."""

import sys

from unix.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
