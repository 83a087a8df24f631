"""Report metrics in the UniX authors' protocol (reference/unix-compat.md 6.1, their
`eval/calculate_und_metrics.py` and `eval/und_metrics/*.py`), known-answer tested against their code.

Every text is first cleaned as they clean it: U+FFFD -> "?", then stripped.
- Clinical efficacy: both sides are labelled with the 14 CheXpert observations from the first 512
  characters of each report (protocol "release"; "full-text" gives the labeller the whole report,
  which CheXbert still caps at 512 wordpieces). Per class F1 = TP / (TP + (FP + FN) / 2), 0 when a
  class never occurs on either side (the authors add 1e-10 to the denominator: values differ from
  theirs by < 1e-9); micro (pooled counts) and macro (mean) over all 14 and over the 5 (atelectasis,
  cardiomegaly, edema, consolidation, pleural effusion). Blank and 0 are negative; uncertain (-1)
  is negative in one policy and positive in the other.
- BLEU-1..4: NLTK `word_tokenize` (Punkt sentence split, then NLTK's Treebank-style word
  tokenizer), `sentence_bleu` with smoothing method 4 and the authors' weights (BLEU-3 uses 0.33,
  not 1/3), averaged over reports. Corpus BLEU is given as well.
- ROUGE-L: `rouge_score` rougeL F-measure (no stemmer). `rouge_l` is the authors' number: the mid
  point of `BootstrapAggregator(0.95, 500)`, here with numpy seeded so it repeats;
  `rouge_l_mean` is the plain mean, `rouge_l_ci95` the bootstrap interval.
- Empty predictions are scored, never dropped (a failed generation is a wrong report): the
  labeller labels the empty text (the rule labeller calls it "No Finding", as it does any report
  without a positive finding), BLEU and ROUGE-L are 0, RadGraph gives 0 (as the authors'
  F1RadGraph does for an empty report). The authors' BLEU skips a prediction without tokens, but
  their CSV reader turns an empty cell into the text "nan", which they score; both are replaced
  here by "an empty report scores 0 and counts".
- An empty reference cannot be scored: its pair is left out and counted (`n_empty_references`).
- METEOR when WordNet data is present, RadGraph F1 when its model is present; otherwise a
  "skipped: ..." entry says what to install.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from unix.eval.chexpert import CHEXPERT_FINDINGS, FIVE_FINDINGS

log = logging.getLogger(__name__)

FIVE_IDX = [CHEXPERT_FINDINGS.index(f) for f in FIVE_FINDINGS]
# The authors' weights (und_metrics/nlp_metrics.py); BLEU-3's 0.33 is theirs, kept for equal numbers.
BLEU_WEIGHTS = ((1, 0, 0, 0), (0.5, 0.5, 0, 0), (0.33, 0.33, 0.33, 0), (0.25, 0.25, 0.25, 0.25))
ROUGE_CONFIDENCE, ROUGE_SAMPLES = 0.95, 500  # their BootstrapAggregator settings
ROUGE_BOOTSTRAP_SEED = 42  # theirs is unseeded; any fixed seed makes the number repeatable
LABEL_CHARS = 512  # their CheXbert mini-batches cut every report at 512 characters
# English Punkt parameters from NLTK's punkt_tab data, shipped unchanged (nltk_data/NOTICE.md).
PUNKT_DIR = Path(__file__).parent / "nltk_data" / "tokenizers" / "punkt_tab" / "english"


@dataclass(frozen=True)
class Protocol:
    name: str
    label_chars: int | None  # the labeller sees the first N characters of each report (None: all)


PROTOCOLS = {"release": Protocol("release", LABEL_CHARS), "full-text": Protocol("full-text", None)}


def describe(protocol: Protocol) -> dict:
    cut = f"first {protocol.label_chars} characters" if protocol.label_chars else "whole report"
    return {**asdict(protocol),
            "labeler_input": f"{cut}; CheXbert: newlines -> spaces, batches of 16 padded to the longest, at most 512 wordpieces",
            "bleu_tokenizer": "nltk word_tokenize (punkt_tab english)",
            "bleu_weights": [list(w) for w in BLEU_WEIGHTS],
            "bleu_average": "mean over reports of sentence_bleu, smoothing method4; an empty prediction scores 0",
            "rouge_l": f"rouge_score rougeL F (no stemmer): BootstrapAggregator({ROUGE_CONFIDENCE}, {ROUGE_SAMPLES}) mid, "
                       f"numpy seed {ROUGE_BOOTSTRAP_SEED}; rouge_l_mean: plain mean"}


def clean(text: str) -> str:
    """The authors' clean-up of both sides before any metric."""
    return str(text).replace("\ufffd", "?").strip()


@functools.cache
def _sentence_splitter():
    """NLTK's Punkt splitter with the shipped English parameters.

    The tables are decoded by NLTK's own punkt_tab decoder from files we open ourselves: NLTK's
    resource loader refuses files that are hard-linked (as uv installs them) or group-writable, which
    would make BLEU depend on how the package was installed."""
    from nltk.tabdata import PunktDecoder
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    decode, params = PunktDecoder(), PunktParameters()
    with open(PUNKT_DIR / "collocations.tab", encoding="utf-8") as f:
        params.collocations = set(decode.tab2tups(f))
    with open(PUNKT_DIR / "sent_starters.txt", encoding="utf-8") as f:
        params.sent_starters = decode.txt2set(f)
    with open(PUNKT_DIR / "abbrev_types.txt", encoding="utf-8") as f:
        params.abbrev_types = decode.txt2set(f)
    with open(PUNKT_DIR / "ortho_context.tab", encoding="utf-8") as f:
        params.ortho_context = decode.tab2intdict(f)
    return PunktSentenceTokenizer(params)


@functools.cache
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` (English, sentence split first), without NLTK's data lookup."""
    words = _word_tokenizer()
    return [tok for sentence in _sentence_splitter().tokenize(text) for tok in words.tokenize(sentence)]


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
    """Mean sentence BLEU-1..4 (a prediction without tokens scores 0) and corpus BLEU-1..4."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

    smooth = SmoothingFunction().method4
    hyp = [word_tokens(p) for p in preds]
    ref = [[word_tokens(r)] for r in refs]
    out = {}
    for n, w in enumerate(BLEU_WEIGHTS, 1):
        out[f"bleu{n}"] = float(np.mean([sentence_bleu(r, h, weights=w, smoothing_function=smooth) if h else 0.0 for h, r in zip(hyp, ref)]))
        out[f"corpus_bleu{n}"] = float(corpus_bleu(ref, hyp, weights=w, smoothing_function=smooth))
    return out


@contextmanager
def _numpy_seed(seed: int):
    """rouge_score's bootstrap draws from numpy's global generator: seed it, then put it back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def rouge_l(preds: list[str], refs: list[str], seed: int = ROUGE_BOOTSTRAP_SEED) -> dict:
    from rouge_score import rouge_scorer, scoring, tokenizers

    # the tokenizer rouge_score picks by default (the authors'), given explicitly: it then logs nothing
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))
    boot = scoring.BootstrapAggregator(confidence_interval=ROUGE_CONFIDENCE, n_samples=ROUGE_SAMPLES)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]  # an empty prediction scores 0
    for s in scores:
        boot.add_scores(s)
    with _numpy_seed(seed):
        agg = boot.aggregate()["rougeL"]
    return {"rouge_l": float(agg.mid.fmeasure), "rouge_l_mean": float(np.mean([s["rougeL"].fmeasure for s in scores])),
            "rouge_l_ci95": [float(agg.low.fmeasure), float(agg.high.fmeasure)]}


def meteor(preds: list[str], refs: list[str]) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(np.mean([meteor_score([word_tokens(r)], word_tokens(p)) for p, r in zip(preds, refs)]))


def radgraph_scores(preds: list[str], refs: list[str], annotate) -> dict:
    """RadGraph F1; an empty prediction is not annotated and scores 0, as in the authors' F1RadGraph."""
    from unix.eval.radgraph import radgraph_f1

    filled = [i for i, p in enumerate(preds) if p]
    got = dict(zip(filled, annotate([preds[i] for i in filled]))) if filled else {}
    return radgraph_f1([got.get(i, {"entities": {}}) for i in range(len(preds))], annotate(refs))


def _pairs(preds: dict[str, str], refs: dict[str, str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(ids, predictions, references) of the pairs to score, and the ids left out for an empty reference."""
    ids, no_ref = [], []
    for i in refs:
        if i in preds:
            (ids if clean(refs[i]) else no_ref).append(i)
    return ids, [clean(preds[i]) for i in ids], [clean(refs[i]) for i in ids], no_ref


def evaluate_reports(preds: dict[str, str], refs: dict[str, str], labeler, radgraph=None,
                     radgraph_missing: str = "radgraph: no annotator given", protocol: str = "release") -> dict:
    """Every number for the reports whose ids appear on both sides (in reference order).
    `labeler`: reports -> (N, 14) CheXpert labels (`unix.eval.chexbert`, `unix.eval.rule_labeler`).
    `radgraph` annotates reports (`unix.eval.radgraph.load_annotator`); without it RadGraph F1 is
    skipped with the `radgraph_missing` note. `protocol`: a key of PROTOCOLS."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    ids, p, r, no_ref = _pairs(preds, refs)
    empty = [i for i, text in zip(ids, p) if not text]
    result: dict = {"n": len(ids), "n_empty_predictions": len(empty), "empty_prediction_ids": empty,
                    "n_empty_references": len(no_ref), "labeler": getattr(labeler, "name", "custom"),
                    "protocol": describe(proto), "skipped": []}
    if empty:
        log.warning("%d empty prediction(s) scored as empty reports (BLEU, ROUGE-L and RadGraph 0), e.g. %s", len(empty), empty[0])
    if no_ref:
        log.warning("%d pair(s) left out: empty reference, e.g. %s", len(no_ref), no_ref[0])
    if not ids:
        return result
    cut = proto.label_chars
    lp, lr = labeler([t[:cut] for t in p]), labeler([t[:cut] for t in r])
    for policy in ("negative", "positive"):
        result[f"uncertain_as_{policy}"] = clinical_f1(positives(lp, policy), positives(lr, policy))
    for name, fn, needs in (("bleu", bleu, "nltk"), ("rouge_l", rouge_l, "rouge-score")):
        try:
            result.update(fn(p, r))
        except ImportError:
            result["skipped"].append(f"{name}: pip install {needs} (or 'unix[eval]')")
    try:
        result["meteor"] = meteor(p, r)
    except (ImportError, LookupError):
        result["skipped"].append("meteor: needs NLTK WordNet data (Debian packages wordnet-base + wordnet-sense-index)")
    if radgraph is None:
        result["skipped"].append(radgraph_missing)
    else:
        result.update(radgraph_scores(p, r, radgraph))
    return result


def markdown_table(result: dict) -> str:
    rows = ["| metric | uncertain as negative | uncertain as positive |", "|---|---|---|"]
    for key in ("micro_f1_14", "micro_f1_5", "macro_f1_14", "macro_f1_5"):
        neg, pos = result["uncertain_as_negative"][key], result["uncertain_as_positive"][key]
        rows.append(f"| {key} | {100 * neg:.1f} | {100 * pos:.1f} |")
    text = "\n".join(rows)
    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "rouge_l_mean", "f1-radgraph", "meteor", "corpus_bleu4")
    extra = [f"| {k} | {result[k]:.4f} |" for k in keys if k in result]
    if extra:
        text += "\n\n| metric | value |\n|---|---|\n" + "\n".join(extra)
    empty = f", {result['n_empty_predictions']} empty predictions scored" if result.get("n_empty_predictions") else ""
    return text + f"\n\n{result['n']} reports{empty}, labeller: {result['labeler']}, protocol: {result['protocol']['name']}"
