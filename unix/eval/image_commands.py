"""`unix eval images`: distribution metrics between real and generated chest X-rays.

    unix eval images --real DIR|list [--real-root DIR] --fake DIR|list [--fake-root DIR]
                     [--protocol release|exact] [--features raddino|phantom] [--labels labels.csv] [--out results.json]

Image lists: a folder (PNG/JPG, searched recursively, sorted by path); a CSV/JSONL manifest with a
`path` column and optional `id`, `annotated_prompt` (or `prompt`) and `chexpert_labels`, such as the
authors' real-image CSV (LLAVARAD_ANNOTATIONS_TEST.csv); or, for --fake, the authors' generation-prompt
CSV (`synthetic_filename`, `annotated_prompt`). Relative paths are under --real-root / --fake-root
(default: the list's folder). An image's id is the manifest `id`, else its path relative to the folder
(or its file name) without extension. Real images with the same prompt are counted once (the first).
`--labels` is a CSV with an `id` column and CheXpert finding columns (1 positive; 0, -1, blank not),
or the authors' generation-prompt CSV (ids: the `synthetic_filename` stems; labels: `chexpert_labels`);
it adds per-finding metrics on the real and fake images whose ids are labelled positive.

`evaluate_image_sets` is the library entry point (`unix eval paper` calls it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unix.data.release_files import FILENAME_COLUMN, PROMPT_COLUMN, parse_labels, read_generation_prompts
from unix.errors import UserError
from unix.eval import image_metrics as im
from unix.eval.features import EXTRACTORS, REFERENCE_INPUT_SIZE, FeatureExtractor, extract_features, get_extractor, load_image
from unix.infer.io import atomic_write, read_table

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PROMPT_COLUMNS = (PROMPT_COLUMN, "prompt")  # the authors' CSVs call it annotated_prompt
AUTHORS_SETTINGS = {  # metrics/fid.py as scripts/image_quality_metrics_memory_saving.sh runs it
    "dedup": "prompt", "n_shards": im.N_SHARDS, "kid_subsets": im.KID_SUBSETS, "nearest_k": im.NEAREST_K, "input_size": REFERENCE_INPUT_SIZE,
}


@dataclass
class ImageItem:
    id: str
    path: Path
    prompt: str | None = None  # the text the image was generated from / reported with; None: not given
    labels: dict | None = None  # CheXpert name -> 1.0 / 0.0 / -1.0 / None, from a `chexpert_labels` cell


def _manifest_item(row, n: int, source: Path, root: Path) -> ImageItem:
    if not isinstance(row, dict) or not row.get("path"):
        raise UserError(f"{source}: row {n} has no `path`")
    path = Path(row["path"])
    path = path if path.is_absolute() else root / path
    prompt = next((row[c] for c in PROMPT_COLUMNS if c in row), None)
    labels = row.get("chexpert_labels")  # a dict literal in the authors' CSVs, a dict in JSONL
    labels = parse_labels(labels, f"{source}: row {n}") if isinstance(labels, str) else labels
    return ImageItem(str(row.get("id") or path.stem), path, None if prompt is None else str(prompt),
                     labels if isinstance(labels, dict) and labels else None)


def list_images(source: str | Path, root: str | Path | None = None, generated: bool = False) -> list[ImageItem]:
    """The images of a folder or of a list, in order. `root`: the folder relative paths are under (default:
    the list's folder). `generated`: a CSV with `synthetic_filename` is read as the authors'
    generation-prompt CSV (its `path` column names the real image, not the generated one)."""
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise UserError(f"{source}: a root folder applies to CSV/JSONL lists, not to a folder of images")
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [ImageItem(p.relative_to(source).with_suffix("").as_posix(), p) for p in paths]
    if not source.is_file():
        raise UserError(f"{source}: no such folder or manifest")
    if source.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"{source}: expected a folder of images or a .csv/.jsonl manifest")
    root = Path(root) if root is not None else source.parent
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (the root of the paths in {source})")
    rows = read_table(source)
    if generated and rows and FILENAME_COLUMN in rows[0]:
        items = [ImageItem(p.id, root / p.filename, p.prompt, p.labels or None) for p in read_generation_prompts(source)]
    else:
        items = [_manifest_item(row, n, source, root) for n, row in enumerate(rows, start=1)]
    if items and not any(item.path.is_file() for item in items):
        raise UserError(f"{source}: none of its {len(items)} images exists (first: {items[0].path}); "
                        "relative paths are under the list's folder unless a root folder is given (--real-root, --fake-root)")
    return items


def deduplicate(items: list[ImageItem]) -> tuple[list[ImageItem], str]:
    """The authors' de-duplication of the real list: one row per prompt, the first in list order (pandas
    `drop_duplicates(subset=["annotated_prompt"])`, where empty prompts count as one). A list without
    prompts is de-duplicated by file. Returns the kept items and the key used ("prompt" or "path")."""
    by_prompt = any(item.prompt is not None for item in items)
    seen, kept = set(), []
    for item in items:
        key = (item.prompt or "") if by_prompt else item.path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept, "prompt" if by_prompt else "path"


def features_of(items: list[ImageItem], extractor, batch_size: int, desc: str, released_round_trip: bool = False):
    """Features of every readable image; unreadable ones are reported and left out.
    Returns (features (N, D) float32, the kept items, the skipped [{path, error}])."""
    kept, skipped = [], []

    def readable():
        for item in items:
            try:
                image = load_image(item.path, extractor.input_size, released_round_trip, "authors" if released_round_trip else "unix")
            except (UserError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                log.warning("skipping %s: %s", item.path, e)
                skipped.append({"path": str(item.path), "error": str(e)})
                continue
            kept.append(item)
            yield image

    feats = extract_features(extractor, readable(), batch_size=batch_size, total=len(items), desc=desc)
    return feats, kept, skipped


def describe_protocol(protocol: str, dedup: str, n_shards: int, kid_subsets: int, nearest_k: int, seed: int, input_size: int) -> dict:
    """What a result's numbers mean: the protocol, its settings, and where they depart from the authors'."""
    release = protocol == "release"
    record = {
        "name": protocol,
        "meaning": im.PROTOCOLS[protocol],
        "dedup": dedup,
        "n_shards": n_shards,
        "kid_subsets": kid_subsets,
        "kid_subset_size": "min(N_real, N_fake) of each shard",
        "kid_sampling": (f"torch.randperm from a torch.Generator seeded {seed} in each shard; the authors drew from torch's "
                         "global generator in a state that cannot be reproduced, which matters only when a shard's "
                         "N_real != N_fake") if release else f"numpy default_rng({seed}) in each shard",
        "nearest_k": nearest_k,
        "seed": seed,
        "input_size": input_size,
        "decimals": im.RELEASE_DECIMALS if release else None,
        "unreadable": "left out and listed under `skipped` (the authors' loader puts a black image in their place)",
        "pixels": ("PIL convert('RGB'), as the authors' metrics/fid.py (a 16-bit image is clipped to white)" if release
                   else "unix.infer.io.read_image (every bit depth by its range, DICOM), 8 bits, three equal channels"),
    }
    if release:
        deviations = [f"{key} {record[key]} (authors: {value})" for key, value in AUTHORS_SETTINGS.items() if record[key] != value]
        if deviations:
            record["deviations"] = deviations
    return record


def evaluate_image_sets(
    real: list[ImageItem],
    fake: list[ImageItem],
    extractor: FeatureExtractor,
    protocol: im.Protocol = "release",
    batch_size: int = 32,
    n_shards: int = im.N_SHARDS,
    kid_subsets: int = im.KID_SUBSETS,
    nearest_k: int = im.NEAREST_K,
    seed: int = im.SEED,
    labels: dict[str, np.ndarray] | None = None,
    min_images: int = 10,
) -> dict:
    """FD, KID and PRDC between two image lists under `protocol` (`image_metrics.PROTOCOLS`).

    Returns {features, protocol (what was done and what it means), n_real, n_fake (readable images after
    de-duplication), n_real_listed, duplicates_dropped (real rows whose prompt, or file, repeats an
    earlier one), metrics {fd, kid, precision, recall, density, coverage; + kid_std under "exact"},
    shards (per-shard metrics), skipped {real, fake}} and, with `labels` (id -> CheXpert row),
    `labelled` and per-finding `conditional` metrics on the images whose ids are labelled positive
    (unsharded, as the authors' conditional script)."""
    if protocol not in im.PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; known: {', '.join(im.PROTOCOLS)}")
    if n_shards < 1 or batch_size < 1:
        raise UserError("the number of shards and the batch size must be at least 1")
    listed = len(real)
    real, dedup = deduplicate(real)
    n_duplicates = listed - len(real)
    if n_duplicates:
        log.info("dropped %d real rows whose %s repeats an earlier one", n_duplicates, dedup)
    round_trip = protocol == "release"
    real_f, real, real_skipped = features_of(real, extractor, batch_size, "real", round_trip)
    fake_f, fake, fake_skipped = features_of(fake, extractor, batch_size, "fake", round_trip)
    need = im.min_samples(nearest_k) * n_shards
    if min(len(real_f), len(fake_f)) < need:
        first = next(iter(real_skipped + fake_skipped), None)
        hint = f"; first unreadable: {first['path']} ({first['error']})" if first else ""
        raise UserError(f"{len(real_f)} real and {len(fake_f)} fake readable images: {n_shards} shard(s) with k={nearest_k} "
                        f"need at least {need} of each (fewer shards: --shards){hint}")
    metric_fn = partial(im.image_metrics, kid_subsets=kid_subsets, nearest_k=nearest_k, seed=seed, protocol=protocol)
    shards = im.shard_values(metric_fn, real_f, fake_f, n_shards)
    result = {
        "features": extractor.name,
        "protocol": describe_protocol(protocol, dedup, n_shards, kid_subsets, nearest_k, seed, extractor.input_size),
        "n_real": len(real_f),
        "n_fake": len(fake_f),
        "n_real_listed": listed,
        "duplicates_dropped": n_duplicates,
        "metrics": im.combine(shards, protocol),
        "shards": shards,
        "skipped": {"real": real_skipped, "fake": fake_skipped},
    }
    if labels is not None:
        n_findings = len(im.CHEXPERT_FINDINGS)
        real_labels, real_found = _labels_for(real, labels, n_findings)
        fake_labels, fake_found = _labels_for(fake, labels, n_findings)
        if real_found + fake_found == 0:
            raise UserError("none of the label ids match an image id (ids are manifest `id`s or file names without extension)")
        result["labelled"] = {"real": real_found, "fake": fake_found}
        result["conditional"] = im.conditional_metrics(
            metric_fn, real_f, fake_f, real_labels, fake_labels, min_images=max(min_images, im.min_samples(nearest_k)))
    return result


def read_labels(path: Path, findings: tuple[str, ...] = im.CHEXPERT_FINDINGS) -> dict[str, np.ndarray]:
    """id -> (len(findings),) float labels, NaN where blank or the column is missing."""
    if not path.is_file():
        raise UserError(f"{path}: no such labels file")
    rows = read_table(path) if path.suffix.lower() in (".csv", ".jsonl") else None
    if rows is None:
        raise UserError(f"{path}: labels must be a .csv or .jsonl file")
    if rows and FILENAME_COLUMN in rows[0] and "chexpert_labels" in rows[0]:
        # the authors' generation-prompt CSV: an image is named by `synthetic_filename`, its labels
        # are the `chexpert_labels` dict of its prompt
        rows = [{"id": p.id, **p.labels} for p in read_generation_prompts(path)]
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


METRIC_LABELS = ("FD", "KID", "precision", "recall", "density", "coverage")


def _values(m: dict, release: bool) -> list[str]:
    kid = f"{m['kid']:.3f}" if release else f"{m['kid']:.4f}" + (f" ± {m['kid_std']:.4f}" if "kid_std" in m else "")
    return [f"{m['fd']:.3f}", kid, *(f"{m[k]:.3f}" for k in ("precision", "recall", "density", "coverage"))]


def format_table(result: dict) -> str:
    p = result["protocol"]
    release = p["name"] == "release"
    lines = [
        f"Image metrics ({result['features']} features, {result['n_real']} real, {result['n_fake']} fake, "
        f"{p['n_shards']}-shard average, protocol {p['name']})",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in zip(METRIC_LABELS, _values(result["metrics"], release))),
        "",
        f"Protocol {p['name']}: {p['meaning']}.",
    ]
    if result["duplicates_dropped"]:
        lines.append(f"Real rows dropped because their {p['dedup']} repeats an earlier row's: {result['duplicates_dropped']}.")
    if p.get("deviations"):
        lines.append(f"Not the authors' settings: {'; '.join(p['deviations'])}.")
    if result.get("conditional"):
        lines += ["", "| finding | real | fake | FD | KID | precision | recall | density | coverage |", "|---|---|---|---|---|---|---|---|---|"]
        for finding, entry in result["conditional"].items():
            values = _values(entry["metrics"], release) if "metrics" in entry else ["-"] * 6
            lines.append(f"| {finding} | {entry['n_real']} | {entry['n_fake']} | {' | '.join(values)} |")
    if result["skipped"]["real"] or result["skipped"]["fake"]:
        lines += ["", f"Unreadable images skipped: {len(result['skipped']['real'])} real, {len(result['skipped']['fake'])} fake."]
    return "\n".join(lines)


def check_image_args(args) -> None:
    from unix.cli import check_number, check_seed

    check_number("--batch-size", args.batch_size, least=1)
    check_number("--shards", args.shards, least=1)
    check_number("--kid-subsets", args.kid_subsets, least=1)
    check_number("--nearest-k", args.nearest_k, least=1)
    check_number("--min-images", args.min_images, least=1)
    check_seed("--seed", args.seed)


def run_images(args) -> int:
    check_image_args(args)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists (use --overwrite to replace it)")
    real = list_images(args.real, args.real_root)
    fake = list_images(args.fake, args.fake_root, generated=True)
    labels = read_labels(Path(args.labels)) if args.labels else None
    extractor = get_extractor(args.features, args.weights_dir, args.device)
    result = evaluate_image_sets(
        real, fake, extractor, protocol=args.protocol, batch_size=args.batch_size, n_shards=args.shards,
        kid_subsets=args.kid_subsets, nearest_k=args.nearest_k, seed=args.seed, labels=labels, min_images=args.min_images,
    )
    print(format_table(result))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def run_agreement(args) -> int:
    """Finding agreement: the phantom classifier's labels on generated images vs their prompts' labels."""
    from unix.eval.phantom_classifier import load_extractor

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists (use --overwrite to replace it)")
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
            image = load_image(item.path, extractor.input_size, reader="unix")
        except (UserError, OSError, ValueError) as e:
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
    p.add_argument("--labels", required=True, help="CSV/JSONL with `id` and the 14 CheXpert columns of each prompt, or the authors' generation-prompt CSV (chexpert_labels)")
    p.add_argument("--weights-dir", default="weights", help="folder holding phantom-classifier/")
    p.add_argument("--uncertain", choices=["negative", "positive"], default="negative", help="how prompt labels of -1 count")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=run_agreement)

    p = subparsers.add_parser("images", help="FD, KID and precision/recall/density/coverage between real and generated images")
    p.add_argument("--real", required=True, help="folder of PNG/JPG images, or a CSV/JSONL list with a `path` column "
                   "(and `annotated_prompt`/`prompt`: repeated prompts count once), e.g. the authors' "
                   "LLAVARAD_ANNOTATIONS_TEST.csv")
    p.add_argument("--real-root", help="folder the relative paths of --real are under (e.g. the MIMIC-CXR-JPG root; "
                   "default: the list's folder)")
    p.add_argument("--fake", required=True, help="generated images: folder, list as --real, or the authors' "
                   "generation-prompt CSV (`synthetic_filename`)")
    p.add_argument("--fake-root", help="folder the relative paths of --fake are under (the generated images; "
                   "default: the list's folder)")
    p.add_argument("--protocol", choices=list(im.PROTOCOLS), default="release",
                   help="release (default): the authors' numbers (torchmetrics, each shard rounded to 3 decimals, "
                   "their mean rounded again; pixels read as they read them, PIL convert(\"RGB\"), which clips 16-bit images to white); "
                   "exact: full precision, pixels read by unix.infer.io.read_image (every bit depth by its range, DICOM)")
    p.add_argument("--features", default="raddino", help=f"feature extractor: {', '.join(sorted(EXTRACTORS))} (default raddino)")
    p.add_argument("--weights-dir", default="weights", help="folder holding rad-dino/ and other metric weights")
    p.add_argument("--labels", help="CSV/JSONL with `id` and CheXpert finding columns: adds per-finding metrics")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=32, help="images per feature-extractor forward (default: 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shards", type=int, default=im.N_SHARDS, help="average the metrics over this many equal parts (CheXGenBench: 4)")
    p.add_argument("--kid-subsets", type=int, default=im.KID_SUBSETS,
                   help=f"random subsets KID is averaged over, at least 1 (default: {im.KID_SUBSETS}, the authors')")
    p.add_argument("--nearest-k", type=int, default=im.NEAREST_K, help="k of precision/recall/density/coverage")
    p.add_argument("--min-images", type=int, default=10, help="per-finding metrics need this many positive images on each side")
    p.add_argument("--seed", type=int, default=im.SEED, help=f"seed of KID's subset draws (default: {im.SEED})")
    p.set_defaults(handler=run_images)
