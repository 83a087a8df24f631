"""`unix eval alignment`: BioViL-T image-text alignment of generated images with their prompts.

    unix eval alignment --images DIR --prompts FILE [--weights-dir weights] [--out results.json]

FILE is the authors' generation-prompt CSV (`annotated_prompt`, `synthetic_filename`: the image is
DIR/synthetic_filename) or our CSV/JSONL with `id` and `prompt` (the image is DIR/<id>.png, .jpg or
.jpeg; `unix generate`'s manifest.jsonl is such a file). Reported as the authors do: each score
rounded to 3 decimals, the mean of those rounded to 3 decimals; the unrounded mean is kept too.
Images that cannot be read and prompts BioViL-T refuses are listed and left out of the mean.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from unix.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_SUBDIR = "biovil-t"  # --weights-dir/biovil-t/ holds the HF repo microsoft/BiomedVLP-BioViL-T
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    prompt: str


def read_pairs(images: Path, prompts: Path) -> list[Pair]:
    """(id, image path, prompt) for each row of the prompts file, in file order."""
    from unix.data.release_files import PROMPT_COLUMN, read_generation_prompts
    from unix.infer.io import read_table

    if not images.is_dir():
        raise UserError(f"{images}: no such folder of generated images")
    if prompts.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"{prompts}: expected a .csv or .jsonl prompts file")
    rows = read_table(prompts)
    if not rows:
        raise UserError(f"{prompts}: no rows")
    if prompts.suffix.lower() == ".csv" and PROMPT_COLUMN in rows[0] and "prompt" not in rows[0]:
        return [Pair(it.id, images / it.filename, it.prompt) for it in read_generation_prompts(prompts)]
    pairs, seen = [], set()
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("prompt") or "").strip():
            raise UserError(f"{prompts}: row {n} has no `prompt` (or use the authors' CSV with `{PROMPT_COLUMN}`)")
        if not str(row.get("id") or "").strip():
            raise UserError(f"{prompts}: row {n} has no `id` (the image is <images>/<id>.png)")
        key = str(row["id"]).strip()
        if key in seen:
            raise UserError(f"{prompts}: id {key!r} appears twice")
        seen.add(key)
        found = [images / f"{key}{s}" for s in IMAGE_SUFFIXES if (images / f"{key}{s}").is_file()]
        pairs.append(Pair(key, found[0] if found else images / f"{key}.png", str(row["prompt"])))
    return pairs


def run_alignment(args) -> int:
    from unix.eval.biovil import load_alignment_scorer, round_like_authors
    from unix.infer.io import atomic_write

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists (use --overwrite or another --out)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    pairs = read_pairs(Path(args.images), Path(args.prompts))
    folder = Path(args.weights_dir) / WEIGHTS_SUBDIR
    scorer = load_alignment_scorer(folder, args.device)
    scores, errors = scorer.score_all([p.image for p in pairs], [p.prompt for p in pairs], args.batch_size)
    for i, reason in errors.items():
        log.warning("skipping %s: %s", pairs[i].id, reason)
    scored = [(p, s) for p, s in zip(pairs, scores) if s is not None]
    if not scored:
        raise UserError(f"no image could be scored ({len(errors)} skipped; first: {next(iter(errors.values()))})")
    rounded, mean = round_like_authors([s for _, s in scored])
    result = {
        "metric": "BioViL-T image-text alignment (hi-ml-multimodal 0.2.2 protocol)",
        "alignment": mean,
        "alignment_unrounded": sum(s for _, s in scored) / len(scored),
        "n_scored": len(scored),
        "n_skipped": len(errors),
        "weights": str(folder),
        "items": [{"id": p.id, "image": str(p.image), "score": s, "score_rounded": r} for (p, s), r in zip(scored, rounded)],
        "skipped": [{"id": pairs[i].id, "image": str(pairs[i].image), "error": reason} for i, reason in errors.items()],
    }
    print(f"Alignment (BioViL-T): {mean:.3f} over {len(scored)} images" + (f", {len(errors)} skipped" if errors else ""))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("alignment", help="BioViL-T image-text alignment of generated images with their prompts")
    p.add_argument("--images", required=True, help="folder of the generated images")
    p.add_argument("--prompts", required=True, help="the authors' generation-prompt CSV, or CSV/JSONL with `id` and `prompt`")
    p.add_argument("--weights-dir", default="weights", help=f"folder holding {WEIGHTS_SUBDIR}/ (the files of microsoft/BiomedVLP-BioViL-T)")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=16, help="images and prompts per forward (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_alignment)
