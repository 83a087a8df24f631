"""`unix eval ...`: report metrics, label extraction, image metrics and the paper's tables."""

from __future__ import annotations

SUBCOMMAND_MODULES = [
    "unix.eval.report_commands",  # unix eval reports | label
    "unix.eval.image_commands",  # unix eval images
    "unix.eval.alignment_commands",  # unix eval alignment
    "unix.eval.paper_commands",  # unix eval paper
]


def register(subparsers) -> None:
    from unix.cli import add_group

    add_group(subparsers, "eval", "evaluate generated reports and images", SUBCOMMAND_MODULES)
