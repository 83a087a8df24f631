"""`unix data phantom`: write a CXR-Phantom data set as parquet shards (and optionally PNG folders)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

from unix.errors import UserError

OUR_OUTPUTS = ("info.json", "metadata.jsonl")  # plus *.parquet shards and the png/ folder


def register(subparsers) -> None:
    p = subparsers.add_parser("phantom", help="generate CXR-Phantom: synthetic chest radiographs with reports and labels")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="data set seed, >= 0; training image i comes from rng([seed, i]), "
                   "val and test images from rng([seed, i, 1 or 2]), never a training image, whatever --n (default: 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 16 (default: 256)")
    p.add_argument("--png", action="store_true", help="also write png/{split}/{id}.png and metadata.jsonl")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions by index (default: 0.8,0.1,0.1)")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per parquet shard (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    p.set_defaults(handler=cmd_phantom)


def parse_splits(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--splits must be three comma-separated numbers, got {text!r}") from None
    if len(parts) != 3 or any(x < 0 for x in parts) or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise UserError(f"--splits must be three non-negative fractions summing to 1 (train,val,test), got {text!r}")
    return parts  # type: ignore[return-value]


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the data set in it")
        for p in out.iterdir():  # remove only what this command writes: stale shards must not mix in
            if p.suffix == ".parquet" or p.name in OUR_OUTPUTS:
                p.unlink()
            elif p.name == "png" and p.is_dir():
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)


def build(out: Path, n: int, seed: int, size: int, splits: tuple[float, float, float], shard_size: int,
          png: bool = False, progress: bool = True) -> dict:
    """Generate images 0..n-1 into `out` (assumed prepared); returns the summary that is also saved
    as info.json: counts per split and per-label prevalence."""
    from tqdm import tqdm

    from unix.data.phantom import LABELS, encode_png, generate, split_of
    from unix.data.shards import ShardWriter, image_report_schema

    schema = image_report_schema(LABELS)
    counts = {name: {"1": 0, "0": 0, "-1": 0} for name in LABELS}
    per_split = {"train": 0, "val": 0, "test": 0}
    writer: ShardWriter | None = None
    meta_tmp = out / ".metadata.jsonl.tmp"
    meta = meta_tmp.open("w") if png else None
    try:
        for i in tqdm(range(n), desc="phantom", unit="img", file=sys.stderr, disable=not progress):
            split = split_of(i, n, splits)
            if writer is None or writer.split != split:  # indices are in split order: one writer at a time
                if writer is not None:
                    writer.close()
                writer = ShardWriter(out, split, schema, shard_size)
            s = generate(seed, i, size, split)  # val and test from their own streams: never a training image
            image = encode_png(s.image)
            labels = {k: (None if math.isnan(v) else v) for k, v in s.labels.items()}
            writer.write({"id": s.id, "split": split, "image": image, "report": s.report, **s.labels,
                          "attributes": json.dumps(s.attributes), "width": size, "height": size})
            per_split[split] += 1
            for k, v in labels.items():
                if v is not None:
                    counts[k][str(int(v))] += 1
            if meta is not None:
                folder = out / "png" / split
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{s.id}.png").write_bytes(image)
                meta.write(json.dumps({"id": s.id, "split": split, "file": f"png/{split}/{s.id}.png", "report": s.report,
                                       "labels": labels, "attributes": s.attributes}) + "\n")
        if writer is not None:
            writer.close()
    finally:
        if meta is not None:
            meta.close()
    if meta is not None:
        os.replace(meta_tmp, out / "metadata.jsonl")
    summary = {"generator": "cxr-phantom", "n": n, "seed": seed, "size": size, "splits": list(splits),
               "shard_size": shard_size, "counts": per_split,
               "prevalence": {k: {s: c / max(n, 1) for s, c in v.items()} for k, v in counts.items()}}
    (out / "info.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def cmd_phantom(args) -> int:
    from unix.data.phantom import check_size

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0 (numpy seeds are non-negative), got {args.seed}")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    try:
        check_size(args.size)
    except ValueError as e:
        raise UserError(f"--size: {e}") from None
    splits = parse_splits(args.splits)
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    summary = build(out, args.n, args.seed, args.size, splits, args.shard_size, png=args.png)
    print(f"wrote {args.n} images ({args.size} px) to {out}: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    print(f"{'label':<28}{'positive':>9}{'uncertain':>10}{'negative':>9}")
    for name, p in summary["prevalence"].items():
        print(f"{name:<28}{p['1']:>9.1%}{p['-1']:>10.1%}{p['0']:>9.1%}")
    return 0
