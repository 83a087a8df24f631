"""`unix eval label` and `unix eval reports`."""

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
    add_labeler_args(p)
    p.set_defaults(handler=cmd_label)

    p = subparsers.add_parser("reports", help="clinical F1 (paper protocol), BLEU, ROUGE-L of generated reports")
    p.add_argument("--pred", required=True, help="CSV/JSONL of generated reports (`id`, `report`)")
    p.add_argument("--ref", required=True, help="CSV/JSONL of reference reports (`id`, `report`)")
    p.add_argument("--out", help="write every number as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here too")
    p.add_argument("--radgraph-dir", default="weights/radgraph",
                   help="RadGraph model (radgraph.tar.gz or radgraph/); skipped when absent (default: weights/radgraph)")
    add_labeler_args(p)
    p.set_defaults(handler=cmd_reports)


def add_labeler_args(p) -> None:
    p.add_argument("--labeler", choices=["rule", "chexbert"], default="rule", help="default: rule (always available)")
    p.add_argument("--weights-dir", default="weights", help="folder holding chexbert/ (default: weights)")
    p.add_argument("--device", default="cpu")


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


def read_reports(path: str) -> tuple[dict[str, str], list[str]]:
    """id -> report text, and the problems found (empty text, missing id, duplicate id)."""
    from unix.infer.io import read_table

    out, problems = {}, []
    for n, row in enumerate(read_table(path), 1):
        rid = str(row.get("id") or "").strip()
        text = row.get("report") if row.get("report") is not None else row.get("text")
        if not rid:
            problems.append(f"{path}: row {n} has no id")
        elif not text or not str(text).strip():
            problems.append(f"{path}: row {n} (id {rid}) has an empty report")
        elif rid in out:
            problems.append(f"{path}: id {rid} appears twice (first kept)")
        else:
            out[rid] = str(text)
    if not out:
        raise UserError(f"{path}: no usable rows (need `id` and `report` columns)")
    return out, problems


def cmd_label(args) -> int:
    from unix.eval.chexpert import CHEXPERT_FINDINGS
    from unix.infer.io import atomic_write

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

    preds, p_problems = read_reports(args.pred)
    refs, r_problems = read_reports(args.ref)
    only_pred = [i for i in preds if i not in refs]
    only_ref = [i for i in refs if i not in preds]
    problems = p_problems + r_problems
    if only_pred:
        problems.append(f"{len(only_pred)} prediction id(s) without a reference, e.g. {only_pred[0]}")
    if only_ref:
        problems.append(f"{len(only_ref)} reference id(s) without a prediction, e.g. {only_ref[0]}")
    for p in problems:
        print(f"unix: warning: {p}", file=sys.stderr)
    radgraph, missing = make_radgraph(args.radgraph_dir, args.device)
    result = evaluate_reports(preds, refs, make_labeler(args), radgraph, missing)
    if result["n"] == 0:
        raise UserError(f"no id appears in both {args.pred} and {args.ref}")
    result["problems"] = problems
    table = markdown_table(result)
    print(table)
    for s in result["skipped"]:
        print(f"skipped: {s}")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write(args.markdown, table + "\n")
    return 0
