"""`unix data mimic`: MIMIC-CXR-JPG images + MIMIC-CXR reports -> training shards (docs/data.md)."""

from __future__ import annotations

from pathlib import Path

from unix.errors import UserError

MIN_IMAGE_SIZE = 32


def register(subparsers) -> None:
    p = subparsers.add_parser("mimic", help="ingest MIMIC-CXR-JPG (+ MIMIC-CXR reports) into training shards")
    p.add_argument("--root", required=True, help="MIMIC-CXR-JPG folder: files/ and the mimic-cxr-2.0.0-*.csv.gz tables")
    p.add_argument("--reports", help="MIMIC-CXR reports: a folder holding files/pXX/pSUBJECT/sSTUDY.txt, or "
                                     "mimic-cxr-reports.zip (default: --root)")
    p.add_argument("--out", required=True, help="shard folder, e.g. data/mimic (resumed when it holds this ingest)")
    p.add_argument("--views", default="PA,AP", help="ViewPosition values to keep, comma-separated (default: PA,AP)")
    p.add_argument("--all-views", action="store_true", help="keep every view, blank ViewPosition included")
    p.add_argument("--image-size", type=int, default=512,
                   help="longer image side in pixels, aspect kept, never upscaled (default: 512, stage 3's size)")
    p.add_argument("--shard-studies", type=int, default=500, help="studies per parquet shard (default: 500)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (the output does not depend on it)")
    p.add_argument("--limit", type=int, help="only the first N studies of each split (a trial run)")
    p.add_argument("--rewrite-cmd", help="shell command that reads a cleaned report on stdin and prints it rewritten")
    p.add_argument("--rewrite-model", help="local transformers causal LM folder that rewrites each cleaned report")
    p.add_argument("--overwrite", action="store_true", help="start again: first remove the shards, summary.json and .ingest/ in --out")
    p.set_defaults(handler=cmd_mimic)


def parse_views(text: str, all_views: bool) -> tuple[str, ...] | None:
    if all_views:
        return None
    views = tuple(dict.fromkeys(v.strip().upper() for v in text.split(",") if v.strip()))
    if not views:
        raise UserError(f"--views must name at least one ViewPosition (PA, AP, LATERAL, LL, ...), got {text!r}")
    return views


def print_summary(summary: dict) -> None:
    reasons = sorted({r for s in summary["splits"].values() for r in s["dropped"]})
    print(f"{'split':<8}{'rows':>8}{'studies':>9}" + "".join(f"{r:>{max(len(r), 6) + 2}}" for r in reasons))
    for split, s in summary["splits"].items():
        print(f"{split:<8}{s['rows']:>8}{s['studies']:>9}"
              + "".join(f"{s['dropped'].get(r, 0):>{max(len(r), 6) + 2}}" for r in reasons))
    if summary["unsplit_dropped"]:
        print("not in the split table: " + ", ".join(f"{k} {v}" for k, v in summary["unsplit_dropped"].items()))
    for reason, items in summary["examples"].items():
        print(f"  {reason}: {items[0]}" + (f" (+{len(items) - 1} more listed in summary.json)" if len(items) > 1 else ""))


def cmd_mimic(args) -> int:
    from unix.data.mimic_ingest import SUMMARY_FILE, Options, ingest

    root, out = Path(args.root), Path(args.out)
    reports = Path(args.reports) if args.reports else root
    if not (root / "files").is_dir():
        raise UserError(f"--root {root}: no files/ folder (the MIMIC-CXR-JPG layout is files/pXX/pSUBJECT/sSTUDY/*.jpg)")
    for name, value, low in (("--image-size", args.image_size, MIN_IMAGE_SIZE), ("--shard-studies", args.shard_studies, 1),
                             ("--workers", args.workers, 1), ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    options = Options(parse_views(args.views, args.all_views), args.image_size, args.shard_studies, args.limit,
                      args.rewrite_cmd, args.rewrite_model)
    try:
        summary, worked = ingest(root, reports, out, options, args.workers, args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {out} are kept; run the same command again to continue")
        return 130
    if not worked:
        print(f"nothing to do: {out} already holds this ingest ({summary['rows']} rows); see {out / SUMMARY_FILE}")
        return 0
    print_summary(summary)
    print(f"wrote {summary['rows']} rows in {len(summary['shards'])} shards to {out} (summary: {out / SUMMARY_FILE})")
    if summary["rows"] == 0:
        print("no rows were written: check --root and --reports against the drop reasons above")
        return 1
    return 0
