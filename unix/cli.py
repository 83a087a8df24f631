"""The `unix` command. Thin: each command group registers its own parser (`register(subparsers)` in
`unix/<area>/commands.py`) and calls into the package; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys

from unix import __version__
from unix.errors import UserError

# Command groups: module path of a `register(subparsers)` function. Imported lazily so that
# `unix --help` stays fast and one broken optional dependency cannot take down every command.
COMMAND_MODULES = [
    "unix.weights.commands",  # unix weights layout|check
    "unix.data.commands",  # unix data phantom|...
    "unix.eval.commands",  # unix eval reports|images|label
    "unix.infer.commands",  # unix report, unix generate
    "unix.train.commands",  # unix train
    "unix.demo.commands",  # unix demo
]

# Every model and tokenizer is read from local folders; nothing is downloaded. huggingface_hub and
# transformers read these once, when they are first imported (radgraph imports them), so they are
# set before any command module is. A user may still set them to 0 in the environment.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

SEED_MAX = 2**63 - 1  # seeds go to torch and numpy generators: non-negative and within int64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unix", description="UniX chest X-ray model: reports, images, training, evaluation.")
    parser.add_argument("--version", action="version", version=f"unix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_modules(sub, COMMAND_MODULES)
    return parser


def add_group(subparsers, name: str, help: str, modules: list[str]):
    """A command group (`unix NAME WHAT ...`) whose subcommands come from `modules`."""
    parser = subparsers.add_parser(name, help=help)
    sub = parser.add_subparsers(dest=f"{name}_command", metavar="WHAT")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    register_modules(sub, modules)
    return sub


def register_modules(subparsers, names: list[str]) -> None:
    """Call `register(subparsers)` of each module; a module absent from this checkout is skipped
    (a missing third-party dependency still fails loudly)."""
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(subparsers)


# --- option checks, for the command handlers: one line naming the option ------------------------

def check_number(option: str, value: float | int | None, least: float | None = None, most: float | None = None,
                 above: float | None = None) -> None:
    """A UserError naming `option` unless `value` (None: not given) is finite and within the bounds:
    `least` <= value <= `most`, value > `above`."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}")
    if least is not None and value < least:
        raise UserError(f"{option} must be at least {least}, got {value}")
    if most is not None and value > most:
        raise UserError(f"{option} must be at most {most}, got {value}")
    if above is not None and value <= above:
        raise UserError(f"{option} must be greater than {above}, got {value}")


def check_seed(option: str, seed: int) -> None:
    """Seeds go to torch and numpy generators: a whole number from 0 to 2^63 - 1."""
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{option} must be a whole number from 0 to 2^63 - 1, got {seed}")


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # pydicom's decoders log a traceback for a file they cannot decode; we report it in one line
        logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)  # (pydicom resets its top logger on import)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        if args.verbose:
            raise
        print(f"unix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
