"""`unix eval ...`: report metrics, label extraction and image metrics."""

from __future__ import annotations


# Each module defines `register(subparsers)` for its own `unix eval` subcommands.
SUBCOMMAND_MODULES = [
    "unix.eval.report_commands",  # unix eval reports | label
    "unix.eval.image_commands",  # unix eval images
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate generated reports and images")
    sub = parser.add_subparsers(dest="eval_command", metavar="WHAT")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    from unix.cli import register_modules

    register_modules(sub, SUBCOMMAND_MODULES)
