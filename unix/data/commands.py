"""`unix data ...`: build data sets and shards."""

from __future__ import annotations


SUBCOMMAND_MODULES = [
    "unix.data.phantom_commands",  # unix data phantom
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="build data sets (CXR-Phantom) and training shards")
    sub = parser.add_subparsers(dest="data_command", metavar="WHAT")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    from unix.cli import register_modules

    register_modules(sub, SUBCOMMAND_MODULES)
