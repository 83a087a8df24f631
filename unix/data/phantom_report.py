"""Report grammar of CXR-Phantom: `FINDINGS: ... IMPRESSION: ...` text for a phantom case.

Wording follows real radiology reports and the CheXpert mention/negation/uncertainty conventions, so a
rule-based labeller recovers the labels of `phantom.labels_of`:
  - a present finding is stated positively ("Small right pleural effusion.")            -> 1
  - a hedged finding always has its own sentence with a hedge ("Possible ...", "... cannot be
    excluded", "... may represent ...")                                                 -> -1
  - a negated label appears as "No X." / "No X or Y." / "Heart size is normal."         -> 0
  - labels the report does not mention                                                 -> blank
Pneumonia is always written with the opacity it is read from; the hedge, when there is one, applies to
the pneumonia in a sentence of its own, never to the opacity. Every template lives in the tables below
(one place to read when writing or testing a labeller). Reports stay short: at most 4 sentences of
findings and 1-2 of impression.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unix.data.phantom import Finding

MAX_FINDING_SENTENCES = 4  # exceeded (by one) only when hedged statements, which never merge, alone overflow it
ORDINALS = {3: "3rd", 4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}
ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
        ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
        ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe"}
REGION = {"upper": "{side} upper lung", "middle": "{side} mid lung", "lower": "{side} lung base"}

# Positive statements, {slots} filled from the finding. "np" = noun phrase (used when merging sentences
# and in the impression); "say" = whole sentences.
POSITIVE = {
    "Cardiomegaly": {"np": ["{sev} cardiomegaly"],
                     "say": ["{Sev} cardiomegaly.", "The heart is {adv} enlarged.", "Heart size is {adv} enlarged.",
                             "{Sev} enlargement of the cardiac silhouette."]},
    "Enlarged Cardiomediastinum": {"np": ["{sev} widening of the mediastinum", "widened mediastinum"],
                                   "say": ["The mediastinum is widened.", "{Sev} widening of the mediastinum.",
                                           "The cardiomediastinal silhouette is enlarged.", "Widened mediastinum."]},
    "Lung Opacity": {"np": ["patchy opacity in the {region}", "{side} {zone_adj} opacity"],
                     "say": ["Patchy opacity in the {region}.", "There is an opacity in the {region}.",
                             "Hazy opacity in the {region}.", "{Side} {zone_adj} opacity."]},
    "Consolidation": {"np": ["{lobe_adj} consolidation", "consolidation in the {lobe}"],
                      "say": ["{Lobe_adj} consolidation.", "Consolidation in the {lobe}.",
                              "There is focal consolidation in the {lobe}.", "Dense consolidation in the {lobe}."]},
    "Pneumonia": {"np": ["{lobe_adj} pneumonia"], "say": ["{Lobe_adj} pneumonia."]},
    "Edema": {"np": ["{sev} pulmonary edema"],
              "say": ["{Sev} pulmonary edema.", "{Sev} interstitial pulmonary edema.", "There is {sev} pulmonary edema.",
                      "{Sev} pulmonary vascular congestion with interstitial edema."]},
    "Atelectasis": {"np": ["{basal} atelectasis"],
                    "say": ["Plate-like atelectasis at the {base}.", "{Basal} subsegmental atelectasis.",
                            "Linear atelectasis at the {base}.", "{Sev} {basal} atelectasis."]},
    "Lung Lesion": {"np": ["{size} cm {lobe_adj} {kind}", "{size} cm {kind} in the {lobe}"],
                    "say": ["A {size} cm {kind} in the {lobe}.", "{Size} cm {lobe_adj} {kind}.",
                            "There is a {size} cm {kind} in the {lobe}.", "{Lobe_adj} {kind} measuring {size} cm."]},
    "Pneumothorax": {"np": ["{sev} {side} pneumothorax"],
                     "say": ["{Sev} {side} pneumothorax.", "{Sev} {side} apical pneumothorax.",
                             "There is a {sev} {side} pneumothorax.", "{Side} pneumothorax, {sev} in size."]},
    "Pleural Effusion": {"np": ["{sev} {side} pleural {effusion}"],
                         "say": ["{Sev} {side} pleural {effusion}.", "There {is} {a}{sev} {side} pleural {effusion}.",
                                 "{Sev} {side} {effusion}.", "{Side} pleural {effusion}, {sev} in size."]},
    "Pleural Other": {"np": ["{pleural_other}"], "say": ["{Pleural_other}.", "There is {pleural_other}."]},
    "Fracture": {"np": ["{age} {side} {ord} rib fracture"],
                 "say": ["{Age} fracture of the {side} {ord} posterior rib.", "{Age} {side} {ord} rib fracture.",
                         "There is a fracture of the {side} {ord} rib."]},
}
PLEURAL_OTHER = {("thickening", "apical"): "{side} apical pleural thickening",
                 ("thickening", None): "pleural thickening along the {side} lateral chest wall",
                 ("plaques", None): "calcified pleural plaques in the {side} hemithorax"}
# Hedged statements: each is its own sentence (the hedge must not reach a neighbouring finding).
HEDGED = ["Possible {np}.", "{Np} cannot be excluded.", "Cannot exclude {np}.", "Questionable {np}."]
PNEUMONIA_WITH = {1: ["{opacity}, consistent with pneumonia.", "{opacity}, in keeping with pneumonia.",
                      "{opacity} compatible with pneumonia."],
                  -1: ["{opacity}. Pneumonia cannot be excluded.", "{opacity}. Possible pneumonia.",
                       "{opacity}. This may represent pneumonia.", "{opacity}. Superimposed infection is not excluded."]}
DEVICES = {"endotracheal tube": ("an endotracheal tube", ["Endotracheal tube terminates {cm} cm above the carina.",
                                                          "Endotracheal tube in standard position."]),
           "enteric tube": ("an enteric tube", ["Enteric tube courses below the diaphragm.",
                                                "Nasogastric tube tip in the stomach."]),
           "central line": ("a right internal jugular central line", ["Right internal jugular central venous catheter tip in the SVC.",
                                                                      "Right IJ central line terminates in the SVC."]),
           "pacemaker": ("a left-sided pacemaker", ["Left chest wall pacemaker with leads in the right atrium and right ventricle.",
                                                    "Left-sided pacemaker with leads in expected position."])}
NEGATED_NP = {"Pneumothorax": "pneumothorax", "Pleural Effusion": "pleural effusion", "Consolidation": "focal consolidation",
              "Edema": "pulmonary edema", "Pneumonia": "pneumonia", "Lung Opacity": "focal opacity",
              "Fracture": "displaced rib fracture"}
NEGATED_LIST = ["No {x}.", "There is no {x}.", "No evidence of {x}."]
NEGATED_HEART = {("Cardiomegaly",): ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly."],
                 ("Enlarged Cardiomediastinum",): ["The mediastinum is not widened.", "Mediastinal contours are normal."],
                 ("Cardiomegaly", "Enlarged Cardiomediastinum"): ["Heart size and mediastinal contours are normal.",
                                                                  "The cardiomediastinal silhouette is normal."]}
NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "No acute intrathoracic process."]
IMPRESSION_ORDER = ("Pneumothorax", "Pneumonia", "Consolidation", "Pleural Effusion", "Edema", "Lung Lesion", "Fracture",
                    "Lung Opacity", "Cardiomegaly", "Enlarged Cardiomediastinum", "Atelectasis", "Pleural Other")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slots(f: Finding) -> dict[str, str]:
    side = f.side or "right"
    zone = f.zone or "lower"
    s = {"sev": f.severity or "", "side": side, "adv": ADVERB.get(f.severity or "mild", "mildly"),
         "lobe": LOBE.get((side, zone), f"{side} lung"),
         "lobe_adj": LOBE.get((side, zone), f"{side} lung").replace("lingula", "lingular"),
         "region": REGION.get(zone, "{side} lung").format(side=side),
         "zone_adj": {"upper": "upper lung", "middle": "mid lung", "lower": "basilar"}.get(zone, "lung"),
         "size": f"{f.size_cm:g}" if f.size_cm else "", "kind": f.kind or "", "ord": ORDINALS.get(f.rib, f"{f.rib}th"),
         "pleural_other": PLEURAL_OTHER.get((f.kind, f.zone), "{side} pleural thickening").format(side=side),
         "age": "healed" if f.kind == "healed" else "acute"}
    plural = side == "bilateral"
    s.update({"effusion": "effusions" if plural else "effusion", "is": "are" if plural else "is", "a": "" if plural else "a "})
    s.update(basal="bibasilar" if plural else f"{side} basilar", base="lung bases" if plural else f"{side} lung base")
    for k in list(s):
        s[k[:1].upper() + k[1:]] = _cap(s[k])
    return s


def _fill(template: str, f: Finding) -> str:
    return " ".join(template.format(**_slots(f)).split())  # collapse the gap an empty slot leaves


def noun_phrase(f: Finding, rng: np.random.Generator) -> str:
    return _fill(_pick(rng, POSITIVE[f.label]["np"]), f)


def _statement(f: Finding, rng: np.random.Generator) -> str:
    if f.status == 1:
        return _fill(_pick(rng, POSITIVE[f.label]["say"]), f)
    np_ = noun_phrase(f, rng)
    return _pick(rng, HEDGED).format(np=np_, Np=_cap(np_))


def _device_sentence(devices: list[Finding], rng: np.random.Generator) -> str:
    if len(devices) == 1:
        return _pick(rng, DEVICES[devices[0].kind][1]).format(cm=int(rng.integers(3, 6)))
    nps = [DEVICES[d.kind][0] for d in devices]
    return _cap(" and ".join([", ".join(nps[:-1]), nps[-1]]) + _pick(rng, [" are in standard position.", " are in place."]))


def _negated_sentences(negated: tuple[str, ...], rng: np.random.Generator) -> list[tuple[str, tuple[str, ...]]]:
    """At most two sentences: heart/mediastinum, then one list ("No A, B, or C."); each with its labels."""
    out = []
    heart = tuple(x for x in ("Cardiomegaly", "Enlarged Cardiomediastinum") if x in negated)
    if heart:
        out.append((_pick(rng, NEGATED_HEART[heart]), heart))
    listed = tuple(x for x in negated if x in NEGATED_NP)
    if listed:
        nps = [NEGATED_NP[x] for x in listed]
        text = nps[0] if len(nps) == 1 else f"{nps[0]} or {nps[1]}" if len(nps) == 2 else ", ".join(nps[:-1]) + f", or {nps[-1]}"
        out.append((_pick(rng, NEGATED_LIST).format(x=text), listed))
    return out


def _n_sentences(text: str) -> int:
    return len(re.findall(r"\.(?:\s|$)", text))  # "3.5 cm" is not a sentence end


def _positive_items(findings: tuple[Finding, ...], rng: np.random.Generator) -> list[tuple[str, Finding | None]]:
    """One sentence per pathology (pneumonia joined to its opacity), with the finding when the sentence is
    a plain positive statement that may later be merged into "A and B."."""
    items = []
    pathologies = [f for f in findings if f.label != "Support Devices"]
    key = lambda f: (f.side, f.zone, f.seed)  # noqa: E731  pneumonia and its opacity share side, zone and seed
    pneumonias = {key(f) for f in pathologies if f.label == "Pneumonia"}
    partners = {key(f): f for f in pathologies if f.label in ("Consolidation", "Lung Opacity") and key(f) in pneumonias}
    for f in pathologies:
        if f.label in ("Consolidation", "Lung Opacity") and partners.get(key(f)) is f:
            continue  # written with its pneumonia
        if f.label == "Pneumonia" and key(f) in partners:
            opacity = _statement(partners[key(f)], rng).rstrip(".")
            items.append((_pick(rng, PNEUMONIA_WITH[f.status]).format(opacity=opacity), None))
        else:
            items.append((_statement(f, rng), f if f.status == 1 else None))
    return items


def _impression(findings: tuple[Finding, ...], rng: np.random.Generator) -> str:
    pathologies = sorted((f for f in findings if f.label != "Support Devices"), key=lambda f: IMPRESSION_ORDER.index(f.label))
    if not pathologies:
        return _pick(rng, NORMAL_IMPRESSION)
    shown = pathologies[:2]
    if any(f.label == "Pneumonia" for f in shown):  # the opacity is already in FINDINGS; lead with the diagnosis
        shown = [f for f in pathologies if f.label not in ("Consolidation", "Lung Opacity") or f.status != 1][:2] or shown
    parts = []
    for f in shown:
        np_ = noun_phrase(f, rng)
        parts.append(_cap(np_) + "." if f.status == 1 else f"Possible {np_}.")
    if len(parts) == 2 and all(f.status == 1 for f in shown):
        return _cap(noun_phrase(shown[0], rng)) + " and " + noun_phrase(shown[1], rng) + "."
    return " ".join(parts)


def write_report(findings: tuple[Finding, ...], negated: tuple[str, ...],
                 rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """FINDINGS + IMPRESSION for these findings, and the labels it actually negates: negations that do
    not fit in MAX_FINDING_SENTENCES are left out (so label them from the returned tuple)."""
    items = _positive_items(findings, rng)
    devices = [f for f in findings if f.label == "Support Devices"]
    budget = MAX_FINDING_SENTENCES - bool(devices)
    sentences = [s for s, _ in items]
    plain = [f for _, f in items if f is not None]
    if sum(map(_n_sentences, sentences)) > budget and len(plain) >= 2:  # merge plain positives: "A and B."
        nps = [noun_phrase(f, rng) for f in plain]
        sentences = [s for s, f in items if f is None] + [_cap(" and ".join(nps[i:i + 2])) + "." for i in range(0, len(nps), 2)]
    negatives = _negated_sentences(negated, rng)
    while negatives and sum(map(_n_sentences, sentences)) + len(negatives) > budget:
        negatives.pop()
    body = sentences + [s for s, _ in negatives]
    if devices:
        body.insert(0, _device_sentence(devices, rng))
    if not any(f.label != "Support Devices" for f in findings) and len(body) < MAX_FINDING_SENTENCES and rng.random() < 0.5:
        body.insert(int(bool(devices)), "The lungs are clear.")
    if not body:
        body = ["The lungs are clear."]
    said = tuple(x for _, labels in negatives for x in labels)
    return "FINDINGS: " + " ".join(body) + " IMPRESSION: " + _impression(findings, rng), said
