"""The paper's two result tables, and ours beside them.

The paper's numbers (arXiv 2601.11522; the release README's result figures `assets/und_metrcis.png`
and `assets/gen_metrcis.png`, transcribed in reference/unix-compat.md): report generation on the
MIMIC-CXR test set (CheXbert F1 in %, uncertain labels counted as negative, then as positive), and
image generation in the CheXGenBench protocol at 512 px and 256 px.

A row of the table is (section, label, the paper's value, a key path into our results, how to
scale ours for display). Our result dictionaries come from `unix.eval.report_metrics` and
`unix.eval.image_commands`; the table never recomputes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_SOURCE = "arXiv 2601.11522 (UniX), result figures of the authors' README"


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    paper: float | None
    key: tuple[str, ...]  # path into our results
    scale: float = 1.0  # ours x scale is shown (F1 in %)
    digits: int = 1
    lower_is_better: bool = False


def report_rows() -> list[Row]:
    rows = []
    paper = {  # (micro 14, micro 5, macro 14, macro 5) in %
        "uncertain_as_negative": (53.6, 56.6, 33.2, 47.3),
        "uncertain_as_positive": (52.6, 57.9, 35.5, 49.8),
    }
    for policy, values in paper.items():
        short = "unc. as neg." if policy.endswith("negative") else "unc. as pos."
        for key, label, value in zip(("micro_f1_14", "micro_f1_5", "macro_f1_14", "macro_f1_5"),
                                     ("Micro F1-14", "Micro F1-5", "Macro F1-14", "Macro F1-5"), values):
            rows.append(Row("reports", f"{label} ({short})", value, ("reports", policy, key), scale=100.0))
    # the paper's table has no language metrics; shown for completeness, no paper value
    for key, label in (("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("f1-radgraph", "RadGraph F1")):
        rows.append(Row("reports", label, None, ("reports", key), digits=4))
    return rows


PAPER_IMAGES = {  # size -> (FD-RadDino, KD-RadDino, alignment, precision, recall, density, coverage)
    512: (54.022, 0.024, 0.635, 0.736, 0.479, 0.536, 0.550),
    256: (65.208, 0.051, 0.251, 0.675, 0.243, 0.366, 0.419),
}
IMAGE_COLUMNS = (  # label, key in our image results, lower is better
    ("FD-RadDino", ("metrics", "fd"), True),
    ("KD-RadDino", ("metrics", "kid"), True),
    ("Alignment", ("alignment", "score"), False),
    ("Precision", ("metrics", "precision"), False),
    ("Recall", ("metrics", "recall"), False),
    ("Density", ("metrics", "density"), False),
    ("Coverage", ("metrics", "coverage"), False),
)


def image_rows(size: int) -> list[Row]:
    paper = PAPER_IMAGES.get(size, (None,) * len(IMAGE_COLUMNS))
    return [Row(f"images {size} px", label, value, (f"images_{size}", *key), digits=3, lower_is_better=lower)
            for (label, key, lower), value in zip(IMAGE_COLUMNS, paper)]


def lookup(results: dict, key: tuple[str, ...]):
    node = results
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def compare(results: dict, sizes: list[int]) -> list[dict]:
    """Each table row with the paper's value, ours (scaled) and the difference (ours - paper)."""
    out = []
    for row in report_rows() + [r for s in sizes for r in image_rows(s)]:
        ours = lookup(results, row.key)
        ours = None if ours is None else round(ours * row.scale, row.digits + 2)
        delta = None if ours is None or row.paper is None else round(ours - row.paper, row.digits + 2)
        out.append({"section": row.section, "metric": row.label, "paper": row.paper, "ours": ours, "delta": delta,
                    "key": ".".join(row.key), "lower_is_better": row.lower_is_better, "digits": row.digits})
    return out


def _fmt(value, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(rows: list[dict], notes: list[str]) -> str:
    lines = []
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"### {section}", "", "| metric | paper | ours | ours - paper |", "|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            d = r["digits"]
            lines.append(f"| {r['metric']} | {_fmt(r['paper'], d)} | {_fmt(r['ours'], d)} | {_fmt(r['delta'], d, signed=True)} |")
        lines.append("")
    lines += [f"Paper values: {PAPER_SOURCE}. '-' = not in the paper, or not computed here (see below)."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
