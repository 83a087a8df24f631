"""`unix eval label` and `unix eval reports`.

`unix eval reports` reads our tables (CSV/JSONL with `id` + `report`) and the authors' files: their
generated-report CSV (`Image Path`, `Report Impression`, `Ground Truth`: `--pred` alone is enough)
and their test JSON as `--ref`. Ids of the authors' files are image file stems (release_files.py).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from unix.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("label", help="CheXpert labels (1, 0, -1, blank) of reports")
    p.add_argument("--in", dest="inp", required=True, help="CSV/JSONL with `id` and `report` (or `text`)")
    p.add_argument("--out", required=True, help="labels CSV: id + the 14 CheXpert columns")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_labeler_args(p)
    p.set_defaults(handler=cmd_label)

    p = subparsers.add_parser("reports", help="clinical F1, BLEU, ROUGE-L (and RadGraph F1) of generated reports, in the authors' protocol")
    p.add_argument("--pred", required=True,
                   help="generated reports: CSV/JSONL (`id`, `report`) or the authors' report CSV (then it holds the references too)")
    p.add_argument("--ref", help="references: CSV/JSONL (`id`, `report`), the authors' test JSON or report CSV "
                                 "(default: the `Ground Truth` column of an authors' report CSV given as --pred)")
    p.add_argument("--protocol", choices=["release", "full-text"], default="release",
                   help="release (default): the authors' (labels from the first 512 characters); full-text: labels from the whole report")
    p.add_argument("--out", help="write every number as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here too")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --markdown if they exist")
    p.add_argument("--radgraph-dir", default="weights/radgraph",
                   help="RadGraph model (radgraph.tar.gz or radgraph/); skipped when absent (default: weights/radgraph)")
    add_labeler_args(p)
    p.set_defaults(handler=cmd_reports)


def add_labeler_args(p) -> None:
    p.add_argument("--labeler", choices=["rule", "chexbert"], default="rule", help="default: rule (always available)")
    p.add_argument("--weights-dir", default="weights", help="folder holding chexbert/ (default: weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for CheXbert and RadGraph (default: cpu)")


def make_labeler(args):
    if args.labeler == "chexbert":
        from unix.eval.chexbert import CheXbertLabeler

        return CheXbertLabeler(Path(args.weights_dir) / "chexbert", args.device)
    from unix.eval.rule_labeler import RuleLabeler

    return RuleLabeler()


def make_radgraph(root: str, device: str):
    """(annotator, None) when the RadGraph model is in `root`, else (None, why it is skipped)."""
    from unix.eval.radgraph import MODEL_FILES, load_annotator

    folder = Path(root)
    if not (folder / "radgraph.tar.gz").is_file() and not all((folder / "radgraph" / f).is_file() for f in MODEL_FILES):
        return None, f"radgraph: no model in {root} (radgraph.tar.gz from StanfordAIMI/RRG_scorers, and pip install radgraph==0.1.18)"
    return load_annotator(folder, device), None


def _keep_first(rows, path: str, problems: list[str]) -> dict[str, str]:
    """(id, text) rows -> id -> text; a repeated id keeps its first text and is reported."""
    out: dict[str, str] = {}
    for rid, text in rows:
        if rid in out:
            problems.append(f"{path}: id {rid} appears twice (first kept)")
        else:
            out[rid] = text
    return out


def read_reports(path: str, keep_empty: bool = False) -> tuple[dict[str, str], list[str]]:
    """id -> report text of a CSV/JSONL with `id` + `report` (or `text`), and the problems found.
    An empty text is kept as "" with `keep_empty` (predictions: scored), else reported and left out."""
    from unix.infer.io import read_table

    rows, problems = [], []
    for n, row in enumerate(read_table(path), 1):
        rid = str(row.get("id") or "").strip()
        text = row.get("report") if row.get("report") is not None else row.get("text")
        text = "" if text is None else str(text)
        if not rid:
            problems.append(f"{path}: row {n} has no id")
        elif not text.strip() and not keep_empty:
            problems.append(f"{path}: row {n} (id {rid}) has an empty report")
        else:
            rows.append((rid, text))
    out = _keep_first(rows, path, problems)
    if not out:
        raise UserError(f"{path}: no usable rows (need `id` and `report` columns)")
    return out, problems


def read_sides(pred: str, ref: str | None) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Predictions and references from `--pred` / `--ref` in any of the accepted formats."""
    from unix.data.release_files import REPORT_CSV_COLUMNS, is_report_csv, is_test_file, read_report_csv, read_test_file

    problems: list[str] = []
    if is_report_csv(pred):
        rows = read_report_csv(pred)
        preds = _keep_first(((r["id"], r["report"]) for r in rows), pred, problems)
        csv_refs = _keep_first(((r["id"], r["reference"]) for r in rows), pred, [])
    else:
        preds, problems = read_reports(pred, keep_empty=True)
        csv_refs = None
    if ref is None:
        if csv_refs is None:
            raise UserError(f"--ref is needed: {pred} is not the authors' report CSV ({', '.join(REPORT_CSV_COLUMNS)})")
        return preds, csv_refs, problems
    if is_test_file(ref):
        refs = {item.id: item.reference for item in read_test_file(ref)}
    elif is_report_csv(ref):
        refs = _keep_first(((r["id"], r["reference"]) for r in read_report_csv(ref)), ref, problems)
    else:
        refs, ref_problems = read_reports(ref, keep_empty=True)  # evaluate_reports reports empty references
        problems += ref_problems
    return preds, refs, problems


def _writable(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it")


def cmd_label(args) -> int:
    from unix.eval.chexpert import CHEXPERT_FINDINGS
    from unix.infer.io import atomic_write

    _writable(args.out, args.overwrite)
    reports, problems = read_reports(args.inp)
    for p in problems:
        print(f"unix: warning: {p}", file=sys.stderr)
    labels = make_labeler(args)(list(reports.values()))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", *CHEXPERT_FINDINGS])
    for rid, row in zip(reports, labels):
        w.writerow([rid, *("" if v is None else v for v in row)])
    atomic_write(args.out, buf.getvalue())
    print(f"{args.out}: {len(reports)} reports labelled ({args.labeler})")
    return 0


def cmd_reports(args) -> int:
    from unix.eval.report_metrics import evaluate_reports, markdown_table
    from unix.infer.io import atomic_write

    _writable(args.out, args.overwrite)
    _writable(args.markdown, args.overwrite)
    preds, refs, problems = read_sides(args.pred, args.ref)
    only_pred = [i for i in preds if i not in refs]
    only_ref = [i for i in refs if i not in preds]
    if only_pred:
        problems.append(f"{len(only_pred)} prediction id(s) without a reference, e.g. {only_pred[0]}")
    if only_ref:
        problems.append(f"{len(only_ref)} reference id(s) without a prediction, e.g. {only_ref[0]}")
    for p in problems:
        print(f"unix: warning: {p}", file=sys.stderr)
    radgraph, missing = make_radgraph(args.radgraph_dir, args.device)
    result = evaluate_reports(preds, refs, make_labeler(args), radgraph, missing, protocol=args.protocol)
    if result["n"] == 0:
        raise UserError(f"no id with a non-empty reference appears in both {args.pred} and {args.ref or args.pred}")
    result["problems"] = problems + _notes(result)  # evaluate_reports has logged the notes
    table = markdown_table(result)
    print(table)
    for s in result["skipped"]:
        print(f"skipped: {s}")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write(args.markdown, table + "\n")
    return 0


def _notes(result: dict) -> list[str]:
    notes = []
    if result["n_empty_predictions"]:
        ids = result["empty_prediction_ids"]
        notes.append(f"{len(ids)} empty prediction(s) scored as empty reports (BLEU, ROUGE-L and RadGraph 0), e.g. {ids[0]}")
    if result["n_empty_references"]:
        notes.append(f"{result['n_empty_references']} pair(s) left out: the reference is empty")
    return notes
