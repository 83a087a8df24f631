"""A rule-based CheXpert-style labeller: mentions, negation and uncertainty, with clause scope.

Per report and observation: 1 (positive), 0 (negative), -1 (uncertain) or None (not mentioned).
Each sentence is split into clauses ("but", "however", ";" end a cue's scope). A mention is
uncertain when its clause carries an uncertainty cue, negative when a negation cue precedes it in
its clause (or a fixed negative phrase names it: "heart size is normal"), else positive. Over a
report, positive wins over uncertain, uncertain over negative (CheXpert's aggregation).
"No Finding" is 1 when no observation but Support Devices is positive or uncertain, else blank.
Always available; CheXbert (`unix.eval.chexbert`) is the learned alternative.
"""

from __future__ import annotations

import re

from unix.eval.chexpert import CHEXPERT_FINDINGS

Label = int | None

MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"widen\w* (of )?(the )?(superior )?mediastin\w*", r"mediastin\w* (is |are )?(\w+ )?widen\w*",
        r"mediastinal widening", r"cardiomediastinal silhouette (is |appears )?(\w+ )?(enlarged|widened|prominent)",
        r"enlarged cardiomediastinal", r"mediastin\w* contours?", r"mediastinum",
    ],
    "Cardiomegaly": [
        r"cardiomegaly", r"heart (size )?(is |appears )?(\w+ )?enlarged", r"enlarge\w* (of )?(the )?(heart|cardiac silhouette)",
        r"cardiac silhouette (is |appears )?(\w+ )?enlarged", r"enlarged (heart|cardiac silhouette)", r"heart size",
        r"cardiac enlargement", r"heart is normal",
    ],
    "Lung Opacity": [r"opacit(y|ies|ification)", r"infiltrate", r"airspace (disease|process)", r"haziness", r"\bhazy\b"],
    "Lung Lesion": [r"nodul\w*", r"\bmass(es)?\b", r"lesion", r"granuloma"],
    "Edema": [r"edema", r"(vascular|pulmonary) congestion", r"\bchf\b", r"heart failure"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumonia", r"infection", r"infectious process"],
    "Atelectasis": [r"atelecta\w*", r"collapse"],
    "Pneumothorax": [r"pneumothora\w*"],
    "Pleural Effusion": [r"effusion", r"pleural fluid", r"blunting of the (\w+ )?costophrenic"],
    "Pleural Other": [r"pleural (thickening|plaques?|scarring)", r"fibrothorax", r"pleural calcification"],
    "Fracture": [r"fracture"],
    "Support Devices": [
        r"(endotracheal|enteric|nasogastric|orogastric|feeding|chest|tracheostomy) tube", r"\b(et|ng|og)\b tube",
        r"catheter", r"central (venous )?line", r"\bpicc\b", r"pacemaker", r"\bicd\b", r"defibrillator",
        r"sternotomy wires", r"\bport\b", r"\bleads?\b", r"\bstent\b", r"\bij\b (central )?line",
    ],
}

# Phrases that state an observation is absent without a leading cue.
NEGATIVE_PHRASES: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"heart size (is |was )?(within )?normal", r"heart (is )?normal in size", r"normal (heart|cardiac) size",
        r"heart size and mediastinal contours are normal", r"cardiomediastinal silhouette (is |appears )?(within )?normal",
        r"normal cardiomediastinal silhouette", r"heart size (is )?(top )?normal",
    ],
    "Enlarged Cardiomediastinum": [
        r"mediastin\w* (contours? )?(is |are )?(within )?normal", r"mediastinum is not widened",
        r"cardiomediastinal silhouette (is |appears )?(within )?normal", r"normal cardiomediastinal silhouette",
        r"normal mediastin\w*", r"heart size and mediastinal contours are normal",
    ],
}

NEGATION_BEFORE = re.compile(
    r"\b(no|without|negative for|free of|absence of|resolution of|resolved|not (?:seen|identified|visualized)|neither|nor|clear of)\b"
)
NEGATION_AFTER = re.compile(r"^\W*(\w+\W+){0,4}?(is|are|has|have)? ?(not (seen|identified|present|visualized|appreciated)|resolved|absent)\b")
UNCERTAIN = re.compile(
    r"\b(possible|possibly|may|might|could|cannot be excluded|cannot exclude|can't exclude|not excluded|not be excluded|"
    r"questionable|question of|likely|probable|probably|suggest\w*|concerning for|versus|vs\.?|differential|"
    r"equivocal|indeterminate|suspicious for|worrisome for|rule out|borderline)\b"
)
CLAUSE_BREAK = re.compile(r";|,? but |,? however,? |,? although |,? whereas ")
SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|\n|\?|!")
HEADERS = re.compile(r"\b(findings|impression|indication|history|comparison|technique)\s*:", re.I)

_MENTION_RX = {k: [re.compile(p) for p in v] for k, v in MENTIONS.items()}
_NEGATIVE_RX = {k: [re.compile(p) for p in v] for k, v in NEGATIVE_PHRASES.items()}


def clauses(report: str) -> list[str]:
    text = HEADERS.sub(". ", report.lower())
    out = []
    for sentence in SENTENCE_END.split(text):
        out += [c.strip() for c in CLAUSE_BREAK.split(sentence) if c and c.strip()]
    return out


def _clause_label(clause: str, finding: str) -> Label:
    """The label one clause gives one observation, or None when it does not mention it."""
    for rx in _NEGATIVE_RX.get(finding, []):
        if rx.search(clause):
            return 0
    spans = [m.span() for rx in _MENTION_RX[finding] for m in rx.finditer(clause)]
    if not spans:
        return None
    start, end = min(spans)
    if UNCERTAIN.search(clause):
        return -1
    if NEGATION_BEFORE.search(clause[:start]) or NEGATION_AFTER.search(clause[end:]):
        return 0
    return 1


def label_report(report: str) -> list[Label]:
    """14 labels in CHEXPERT_FINDINGS order."""
    found: dict[str, Label] = {}
    rank = {1: 3, -1: 2, 0: 1}
    for clause in clauses(report):
        for finding in MENTIONS:
            lab = _clause_label(clause, finding)
            if lab is not None and rank[lab] > rank.get(found.get(finding), 0):
                found[finding] = lab
    sick = any(v in (1, -1) for k, v in found.items() if k != "Support Devices")
    found["No Finding"] = None if sick else 1
    return [found.get(name) for name in CHEXPERT_FINDINGS]


class RuleLabeler:
    name = "rule"

    def __call__(self, reports: list[str]) -> list[list[Label]]:
        return [label_report(r) for r in reports]
