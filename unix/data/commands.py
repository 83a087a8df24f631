"""`unix data ...`: build data sets and shards."""

from __future__ import annotations

SUBCOMMAND_MODULES = [
    "unix.data.phantom_commands",  # unix data phantom
    "unix.data.mimic_commands",  # unix data mimic
]


def register(subparsers) -> None:
    from unix.cli import add_group

    add_group(subparsers, "data", "build data sets (CXR-Phantom) and training shards", SUBCOMMAND_MODULES)
