"""Report metrics, following the paper's protocol (reference section 6.1).

- Clinical efficacy: generated and reference reports are labelled with the 14 CheXpert
  observations; per class F1 = TP / (TP + (FP + FN) / 2) (0 when a class never occurs on either
  side, as the reference's +1e-10 gives); micro (pooled counts) and macro (mean) F1 over all 14 and
  over the 5 (atelectasis, cardiomegaly, edema, consolidation, pleural effusion). Blank and 0 are
  negative; uncertain (-1) counts as negative in one policy and as positive in the other.
- BLEU-1..4: per report (NLTK sentence_bleu, smoothing method 4, as the reference) and averaged;
  corpus BLEU as well. Tokens: words and punctuation, case kept (NLTK's `word_tokenize` needs punkt
  data that is not available offline; this regex splits the same way for report text).
- ROUGE-L: `rouge_score` rougeL F-measure per report, averaged (the reference reports a bootstrap
  mid-point of the same mean).
- METEOR when WordNet data is present, RadGraph F1 when its model is present; otherwise a
  "skipped: ..." entry says what to install.
"""

from __future__ import annotations

import re

import numpy as np

from unix.eval.chexpert import CHEXPERT_FINDINGS, FIVE_FINDINGS

TOKEN = re.compile(r"\w+(?:[.'-]\w+)*|[^\w\s]")
FIVE_IDX = [CHEXPERT_FINDINGS.index(f) for f in FIVE_FINDINGS]


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text)


def positives(labels: list[list], uncertain: str) -> np.ndarray:
    """(N, 14) labels in {1, 0, -1, None} -> bool, uncertain as `uncertain` ('negative'|'positive')."""
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in labels], dtype=float).reshape(-1, len(CHEXPERT_FINDINGS))
    pos = arr == 1
    return pos | (arr == -1) if uncertain == "positive" else pos


def f1(tp: int, fp: int, fn: int) -> float:
    return tp / (tp + 0.5 * (fp + fn)) if tp + fp + fn else 0.0


def clinical_f1(pred: np.ndarray, ref: np.ndarray) -> dict:
    """pred, ref: (N, 14) bool. Per-class, micro and macro F1 over 14 and over the 5."""
    tp = (pred & ref).sum(0)
    fp = (pred & ~ref).sum(0)
    fn = (~pred & ref).sum(0)
    per = [f1(*c) for c in zip(tp, fp, fn)]
    out = {"f1_" + name: per[i] for i, name in enumerate(CHEXPERT_FINDINGS)}
    for tag, idx in (("14", list(range(len(CHEXPERT_FINDINGS)))), ("5", FIVE_IDX)):
        out[f"micro_f1_{tag}"] = f1(int(tp[idx].sum()), int(fp[idx].sum()), int(fn[idx].sum()))
        out[f"macro_f1_{tag}"] = float(np.mean([per[i] for i in idx]))
    return out


def bleu(preds: list[str], refs: list[str]) -> dict:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

    smooth = SmoothingFunction().method4
    weights = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
    hyp = [tokenize(p) for p in preds]
    ref = [[tokenize(r)] for r in refs]
    out = {}
    for n, w in enumerate(weights, 1):
        out[f"bleu{n}"] = float(np.mean([sentence_bleu(r, h, weights=w, smoothing_function=smooth) if h else 0.0 for h, r in zip(hyp, ref)]))
        out[f"corpus_bleu{n}"] = float(corpus_bleu(ref, hyp, weights=w, smoothing_function=smooth))
    return out


def rouge_l(preds: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]))


def meteor(preds: list[str], refs: list[str]) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(np.mean([meteor_score([tokenize(r)], tokenize(p)) for p, r in zip(preds, refs)]))


def evaluate_reports(preds: dict[str, str], refs: dict[str, str], labeler, radgraph=None,
                     radgraph_missing: str = "radgraph: no annotator given") -> dict:
    """Every number for the reports whose ids appear on both sides (in reference order).
    `radgraph` annotates reports (`unix.eval.radgraph.load_annotator`); without it RadGraph F1 is
    skipped with the `radgraph_missing` note."""
    ids = [i for i in refs if i in preds]
    p, r = [preds[i] for i in ids], [refs[i] for i in ids]
    result: dict = {"n": len(ids), "labeler": getattr(labeler, "name", "custom"), "skipped": []}
    if not ids:
        return result
    lp, lr = labeler(p), labeler(r)
    for policy in ("negative", "positive"):
        result[f"uncertain_as_{policy}"] = clinical_f1(positives(lp, policy), positives(lr, policy))
    for name, fn, needs in (("bleu", bleu, "nltk"), ("rouge_l", rouge_l, "rouge-score")):
        try:
            value = fn(p, r)
        except ImportError:
            result["skipped"].append(f"{name}: pip install {needs} (or 'unix[eval]')")
            continue
        result.update(value if isinstance(value, dict) else {name: value})
    try:
        result["meteor"] = meteor(p, r)
    except (ImportError, LookupError):
        result["skipped"].append("meteor: needs NLTK WordNet data (Debian packages wordnet-base + wordnet-sense-index)")
    if radgraph is None:
        result["skipped"].append(radgraph_missing)
    else:
        from unix.eval.radgraph import radgraph_f1

        result.update(radgraph_f1(radgraph(p), radgraph(r)))
    return result


def markdown_table(result: dict) -> str:
    rows = ["| metric | uncertain as negative | uncertain as positive |", "|---|---|---|"]
    for key in ("micro_f1_14", "micro_f1_5", "macro_f1_14", "macro_f1_5"):
        neg, pos = result["uncertain_as_negative"][key], result["uncertain_as_positive"][key]
        rows.append(f"| {key} | {100 * neg:.1f} | {100 * pos:.1f} |")
    text = "\n".join(rows)
    extra = [f"| {k} | {result[k]:.4f} |" for k in ("bleu1", "bleu4", "corpus_bleu4", "rouge_l", "meteor") if k in result]
    if extra:
        text += "\n\n| metric | value |\n|---|---|\n" + "\n".join(extra)
    return text + f"\n\n{result['n']} reports, labeller: {result['labeler']}"
