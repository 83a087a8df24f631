"""`unix eval images`: distribution metrics between real and generated chest X-rays.

    unix eval images --real DIR|manifest --fake DIR|manifest [--features raddino|phantom]
                     [--labels labels.csv] [--out results.json]

Images come from a folder (PNG/JPG, searched recursively, sorted by path) or a CSV/JSONL manifest
with a `path` column (relative paths are relative to the manifest) and an optional `id`. An image's
id is the manifest `id`, else its path relative to the folder (or its file name) without extension.
`--labels` is a CSV with an `id` column and CheXpert finding columns (1 positive; 0, -1, blank not);
it adds per-finding metrics on the real and fake images whose ids are labelled positive.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unix.errors import UserError
from unix.eval import image_metrics as im
from unix.eval.features import EXTRACTORS, extract_features, get_extractor
from unix.infer.io import atomic_write, read_table

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageItem:
    id: str
    path: Path


def list_images(source: str | Path) -> list[ImageItem]:
    """The images of a folder or of a CSV/JSONL manifest, in order."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [ImageItem(p.relative_to(source).with_suffix("").as_posix(), p) for p in paths]
    if not source.is_file():
        raise UserError(f"{source}: no such folder or manifest")
    if source.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"{source}: expected a folder of images or a .csv/.jsonl manifest")
    items = []
    for n, row in enumerate(read_table(source), start=1):
        if not isinstance(row, dict) or not row.get("path"):
            raise UserError(f"{source}: row {n} has no `path`")
        path = Path(row["path"])
        path = path if path.is_absolute() else source.parent / path
        items.append(ImageItem(str(row.get("id") or path.stem), path))
    return items


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8, as CheXGenBench loads images: RGB, bilinear resize to a square."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W)


def features_of(items: list[ImageItem], extractor, batch_size: int, desc: str) -> tuple[np.ndarray, list[ImageItem], list[dict]]:
    """Features of every readable image; unreadable ones are reported and left out."""
    kept, skipped = [], []

    def readable():
        for item in items:
            try:
                image = load_image(item.path, extractor.input_size)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                log.warning("skipping %s: %s", item.path, e)
                skipped.append({"path": str(item.path), "error": str(e)})
                continue
            kept.append(item)
            yield image

    feats = extract_features(extractor, readable(), batch_size=batch_size, total=len(items), desc=desc)
    return feats, kept, skipped


def read_labels(path: Path, findings: tuple[str, ...] = im.CHEXPERT_FINDINGS) -> dict[str, np.ndarray]:
    """id -> (len(findings),) float labels, NaN where blank or the column is missing."""
    if not path.is_file():
        raise UserError(f"{path}: no such labels file")
    rows = read_table(path) if path.suffix.lower() in (".csv", ".jsonl") else None
    if rows is None:
        raise UserError(f"{path}: labels must be a .csv or .jsonl file")
    # `unix data phantom --png` metadata nests the labels: {"id": ..., "labels": {"Cardiomegaly": 1, ...}}
    rows = [{**row, **row["labels"]} if isinstance(row.get("labels"), dict) else row for row in rows]
    if rows and "id" not in rows[0]:
        raise UserError(f"{path}: needs an `id` column")
    if rows and not any(f in rows[0] for f in findings):
        raise UserError(f"{path}: none of the CheXpert finding columns ({', '.join(findings)})")

    def value(v) -> float:
        try:
            return float(v) if v not in (None, "") else np.nan
        except ValueError:
            raise UserError(f"{path}: label value {v!r} is not a number") from None

    return {str(row["id"]): np.array([value(row.get(f)) for f in findings]) for row in rows}


def _labels_for(items: list[ImageItem], labels: dict[str, np.ndarray], n_findings: int) -> tuple[np.ndarray, int]:
    missing = np.full(n_findings, np.nan)
    found = sum(item.id in labels for item in items)
    return np.stack([labels.get(item.id, missing) for item in items]) if items else np.zeros((0, n_findings)), found


def format_table(result: dict) -> str:
    m = result["metrics"]
    lines = [
        f"Image metrics ({result['features']} features, {result['n_real']} real, {result['n_fake']} fake, "
        f"{result['protocol']['n_shards']}-shard average)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| FD | {m['fd']:.3f} |",
        f"| KID | {m['kid']:.4f} ± {m['kid_std']:.4f} |",
        *(f"| {name} | {m[name]:.3f} |" for name in ("precision", "recall", "density", "coverage")),
    ]
    if result.get("conditional"):
        lines += ["", "| finding | real | fake | FD | KID | precision | recall | density | coverage |", "|---|---|---|---|---|---|---|---|---|"]
        for finding, entry in result["conditional"].items():
            if "metrics" in entry:
                c = entry["metrics"]
                values = f"{c['fd']:.3f} | {c['kid']:.4f} | " + " | ".join(f"{c[k]:.3f}" for k in ("precision", "recall", "density", "coverage"))
            else:
                values = " | ".join(["-"] * 6)
            lines.append(f"| {finding} | {entry['n_real']} | {entry['n_fake']} | {values} |")
    if result["skipped"]["real"] or result["skipped"]["fake"]:
        lines += ["", f"Unreadable images skipped: {len(result['skipped']['real'])} real, {len(result['skipped']['fake'])} fake."]
    return "\n".join(lines)


def run_images(args) -> int:
    real_items, fake_items = list_images(args.real), list_images(args.fake)
    n_dup = len(real_items) - len({item.path.resolve() for item in real_items})
    if n_dup:  # CheXGenBench de-duplicates the real list (several prompts share one study image)
        seen, unique = set(), []
        for item in real_items:
            if item.path.resolve() not in seen:
                seen.add(item.path.resolve())
                unique.append(item)
        real_items = unique
        log.info("dropped %d duplicate real images", n_dup)
    labels = read_labels(Path(args.labels)) if args.labels else None
    if args.shards < 1 or args.batch_size < 1:
        raise UserError("--shards and --batch-size must be at least 1")

    extractor = get_extractor(args.features, args.weights_dir, args.device)
    real, real_items, real_skipped = features_of(real_items, extractor, args.batch_size, "real")
    fake, fake_items, fake_skipped = features_of(fake_items, extractor, args.batch_size, "fake")
    need = im.min_samples(args.nearest_k) * args.shards
    if min(len(real), len(fake)) < need:
        raise UserError(
            f"{len(real)} real and {len(fake)} fake readable images: {args.shards} shard(s) with k={args.nearest_k} "
            f"need at least {need} of each (fewer shards: --shards)"
        )

    def metric_fn(r, f):
        return im.image_metrics(r, f, kid_subsets=args.kid_subsets, nearest_k=args.nearest_k, seed=args.seed)

    shards = im.shard_values(metric_fn, real, fake, args.shards)
    result = {
        "features": args.features,
        "n_real": len(real),
        "n_fake": len(fake),
        "protocol": {"n_shards": args.shards, "kid_subsets": args.kid_subsets, "nearest_k": args.nearest_k, "seed": args.seed, "input_size": extractor.input_size},
        "metrics": im.average(shards),
        "shards": shards,
        "skipped": {"real": real_skipped, "fake": fake_skipped},
    }
    if labels is not None:
        n_findings = len(im.CHEXPERT_FINDINGS)
        real_labels, real_found = _labels_for(real_items, labels, n_findings)
        fake_labels, fake_found = _labels_for(fake_items, labels, n_findings)
        if real_found + fake_found == 0:
            raise UserError(f"{args.labels}: none of its ids match an image id (ids are manifest `id`s or file names without extension)")
        result["labelled"] = {"real": real_found, "fake": fake_found}
        result["conditional"] = im.conditional_metrics(
            metric_fn, real, fake, real_labels, fake_labels, min_images=max(args.min_images, im.min_samples(args.nearest_k))
        )
    print(format_table(result))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def run_agreement(args) -> int:
    """Finding agreement: the phantom classifier's labels on generated images vs their prompts' labels."""
    from unix.eval.phantom_classifier import load_extractor

    items = list_images(args.images)
    labels = read_labels(Path(args.labels))
    extractor = load_extractor(args.weights_dir, args.device if args.device != "auto" else "cpu")
    kept, probs, skipped = [], [], []
    for item in items:
        stem = Path(item.id).name
        # the id itself, the file name in a folder tree, or `ID_k` (k-th image of prompt ID)
        key = next((k for k in (item.id, stem, stem.rsplit("_", 1)[0]) if k in labels), None)
        if key is None:
            skipped.append({"path": str(item.path), "error": f"no labels for id {item.id!r}"})
            continue
        try:
            image = load_image(item.path, extractor.input_size)
        except (OSError, ValueError) as e:
            skipped.append({"path": str(item.path), "error": str(e)})
            continue
        kept.append(key)
        probs.append(extractor.predict(image[None])[0])
    for s in skipped:
        log.warning("skipping %s: %s", s["path"], s["error"])
    if not kept:
        raise UserError(f"{args.images}: no readable image has labels in {args.labels}")
    pred = (torch.stack(probs).numpy() >= 0.5).astype(float)
    result = im.finding_agreement(pred, np.stack([labels[k] for k in kept]), uncertain=args.uncertain)
    result["skipped"] = skipped
    print("| finding | F1 | TP | FP | FN |\n|---|---|---|---|---|")
    for name, v in result["per_finding"].items():
        f1 = "-" if v["f1"] is None else f"{v['f1']:.3f}"
        print(f"| {name} | {f1} | {v['tp']} | {v['fp']} | {v['fn']} |")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"\nmicro F1 {fmt(result['micro_f1'])}, macro F1 {fmt(result['macro_f1'])} over {result['n']} images")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("agreement", help="finding agreement of generated phantom images with their prompts' labels")
    p.add_argument("--images", required=True, help="generated images: folder or CSV/JSONL manifest (ids = prompt ids, or ID_k)")
    p.add_argument("--labels", required=True, help="CSV/JSONL with `id` and the 14 CheXpert columns of each prompt")
    p.add_argument("--weights-dir", default="weights", help="folder holding phantom-classifier/")
    p.add_argument("--uncertain", choices=["negative", "positive"], default="negative", help="how prompt labels of -1 count")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(handler=run_agreement)

    p = subparsers.add_parser("images", help="FD, KID and precision/recall/density/coverage between real and generated images")
    p.add_argument("--real", required=True, help="folder of PNG/JPG images, or a CSV/JSONL manifest with a `path` column")
    p.add_argument("--fake", required=True, help="generated images: folder or manifest, as --real")
    p.add_argument("--features", default="raddino", help=f"feature extractor: {', '.join(sorted(EXTRACTORS))} (default raddino)")
    p.add_argument("--weights-dir", default="weights", help="folder holding rad-dino/ and other metric weights")
    p.add_argument("--labels", help="CSV/JSONL with `id` and CheXpert finding columns: adds per-finding metrics")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shards", type=int, default=im.N_SHARDS, help="average the metrics over this many equal parts (CheXGenBench: 4)")
    p.add_argument("--kid-subsets", type=int, default=im.KID_SUBSETS)
    p.add_argument("--nearest-k", type=int, default=im.NEAREST_K, help="k of precision/recall/density/coverage")
    p.add_argument("--min-images", type=int, default=10, help="per-finding metrics need this many positive images on each side")
    p.add_argument("--seed", type=int, default=im.SEED)
    p.set_defaults(handler=run_images)
