"""The `unix` command. Thin: each command group registers its own parser (`register(subparsers)` in
`unix/<area>/commands.py`) and calls into the package; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from unix.errors import UserError

# Command groups: module path of a `register(subparsers)` function. Imported lazily so that
# `unix --help` stays fast and one broken optional dependency cannot take down every command.
COMMAND_MODULES = [
    "unix.weights.commands",  # unix weights layout|check
    "unix.data.commands",  # unix data phantom|...
    "unix.eval.commands",  # unix eval reports|images|label
    "unix.infer.commands",  # unix report, unix generate
    "unix.train.commands",  # unix train
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unix", description="UniX chest X-ray model: reports, images, training, evaluation.")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
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
