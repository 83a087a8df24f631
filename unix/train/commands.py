"""`unix train CONFIG.yaml [key=value ...]` (also `torchrun ... -m unix.train CONFIG [key=value ...]`)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="run one training stage (single process, or under torchrun)")
    p.add_argument("config", help="stage config YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100 data.shards=DIR")
    p.set_defaults(handler=cmd_train)


def cmd_train(args) -> int:
    from unix.train.config import load_train_config
    from unix.train.trainer import run

    history = run(load_train_config(args.config, args.overrides))
    if history:
        print(f"done: {len(history)} steps, last loss {history[-1]['loss']:.4f}")
    return 0
