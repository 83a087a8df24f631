"""`unix eval ...`: report metrics, label extraction and image metrics."""

from __future__ import annotations

SUBCOMMAND_MODULES = [
    "unix.eval.report_commands",  # unix eval reports | label
    "unix.eval.image_commands",  # unix eval images
]


def register(subparsers) -> None:
    from unix.cli import add_group

    add_group(subparsers, "eval", "evaluate generated reports and images", SUBCOMMAND_MODULES)
