"""The scoring half of `unix eval paper`: every metric of the paper's tables on the run's outputs,
in the authors' protocol, each skipped with its reason when its weights are missing."""

from __future__ import annotations

import logging
from pathlib import Path

from unix.data.release_files import PromptItem, TestItem

log = logging.getLogger(__name__)


def _labeler(args, notes: list[str]):
    from unix.eval.chexbert import CheXbertLabeler
    from unix.eval.rule_labeler import RuleLabeler
    from unix.eval.features import resolve_device

    folder = Path(args.metric_weights) / "chexbert"
    present = (folder / "chexbert.pth").is_file()
    if args.labeler == "chexbert" or (args.labeler == "auto" and present):
        return CheXbertLabeler(folder, str(resolve_device(args.device)))
    if args.labeler == "auto":
        notes.append(f"clinical F1 with the rule labeller: no CheXbert in {folder}/ (chexbert.pth + bert-base-uncased/); "
                     "the paper used CheXbert, so these F1 are not comparable")
    else:
        notes.append("clinical F1 with the rule labeller (--labeler rule): not comparable with the paper's CheXbert F1")
    return RuleLabeler()


def report_results(args, items: list[TestItem], rows: dict[str, dict], notes: list[str]) -> dict:
    from unix.eval.features import resolve_device
    from unix.eval.report_commands import make_radgraph
    from unix.eval.report_metrics import evaluate_reports

    failed = [it.id for it in items if rows.get(it.id, {}).get("error")]
    if failed:
        notes.append(f"{len(failed)} test image(s) could not be read and score as empty reports, e.g. {failed[0]}: "
                     f"{rows[failed[0]]['error']}")
    preds = {it.id: rows[it.id].get("report") or "" for it in items if it.id in rows}
    refs = {it.id: it.reference for it in items}
    radgraph, missing = make_radgraph(str(Path(args.metric_weights) / "radgraph"), str(resolve_device(args.device)))
    result = evaluate_reports(preds, refs, _labeler(args, notes), radgraph, missing, protocol="release")
    if result.get("n_empty_predictions"):
        notes.append(f"{result['n_empty_predictions']} empty report(s) scored as empty texts, as the authors score them")
    notes.extend(f"skipped: {s}" for s in result.get("skipped", []))
    return result


def _real_items(args, limit: int | None):
    from unix.eval.image_commands import deduplicate, list_images

    source = args.real_csv or args.gen_prompts
    items = list_images(source, root=args.mimic)  # its `path` column: the real image under the MIMIC root
    items, _ = deduplicate(items)  # before --limit, so a subset holds distinct prompts as the full run does
    return items[:limit] if limit else items


def image_results(args, prompts: list[PromptItem], paths: list[Path], notes: list[str]) -> dict:
    """FD/KD-RadDino and PRDC against the real images, and the alignment score, for one image size."""
    from unix.eval.features import get_extractor
    from unix.eval.image_commands import ImageItem, evaluate_image_sets
    from unix.errors import UserError

    size = paths[0].parent.name.removeprefix("images_") if paths else "?"
    fake = [ImageItem(it.id, p, it.prompt) for it, p in zip(prompts, paths)]
    result: dict = {}
    raddino = Path(args.metric_weights) / "rad-dino"
    if not (raddino / "config.json").is_file():
        notes.append(f"skipped: FD/KD-RadDino and PRDC at {size} px: no RAD-DINO in {raddino}/ (microsoft/rad-dino, transformers layout)")
    else:
        try:
            real = _real_items(args, args.limit)
            extractor = get_extractor("raddino", args.metric_weights, args.device)
            result.update(evaluate_image_sets(real, fake, extractor, protocol=args.image_protocol,
                                              batch_size=args.batch_size, n_shards=args.image_shards))
        except UserError as e:  # too few images for the shards, no real list, ...: the rest of the table stands
            notes.append(f"skipped: image metrics at {size} px: {e}")
        else:
            if args.image_shards != 4:
                notes.append(f"image metrics at {size} px over {args.image_shards} shard(s), not the paper's 4")
    result["alignment"] = _alignment(args, fake, notes, size)
    return result


def _alignment(args, fake, notes: list[str], size: str) -> dict | None:
    """The BioViL-T image-text score of each generated image with its prompt, the authors' rounding."""
    from unix.eval.biovil import load_alignment_scorer, missing_files, round_like_authors

    folder = Path(args.metric_weights) / "biovil-t"
    missing = missing_files(folder)
    if missing:
        notes.append(f"skipped: alignment at {size} px: no BioViL-T in {folder}/ (missing {', '.join(missing)})")
        return None
    scorer = load_alignment_scorer(folder, args.device)
    scores, errors = scorer.score_all([it.path for it in fake], [it.prompt for it in fake], batch_size=args.batch_size)
    kept = [s for s in scores if s is not None]
    if errors:
        i, reason = next(iter(errors.items()))
        notes.append(f"alignment at {size} px: {len(errors)} image(s) could not be scored and are left out, e.g. {fake[i].id}: {reason}")
    if not kept:
        return {"score": None, "n": 0, "errors": len(errors)}
    rounded, mean = round_like_authors(kept)
    return {"score": mean, "n": len(kept), "errors": len(errors), "rounding": "each score to 3 decimals, their mean to 3 (the authors')"}
