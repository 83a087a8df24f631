"""Report metrics against the UniX authors' own metric code, on report pairs built for it.

Known answers were produced outside this repository (2026-12) by running the authors' modules
`eval/und_metrics/{metrics_clinical,chexbert_metrics,nlp_metrics,chexbert}.py` (ZrH42/UniX HEAD) as
they are, in a venv with their pins nltk==3.9.2, rouge_score==0.1.2, numpy==1.24.4, and NLTK's
punkt_tab data (the same files as unix/eval/nltk_data). Stand-ins replaced only torch, transformers
and the CheXbert network: a fake network returned the label rows below for each text. Calls:
  calculate_chexbert_metrics(PREDS, REFS, path)       -> THEIR_NEGATIVE / THEIR_POSITIVE
  np.random.seed(42); calculate_nlp_metrics(PREDS, REFS) -> THEIR_NLP
  CheXbert.forward on CheXbertMetrics.mini_batch([LONG_REF, "  a\\nb  "]) -> texts it tokenises
with PREDS / REFS = CASES stripped (their calculate_und_metrics clean-up).
"""

import logging
import os
import shutil

import numpy as np
import pytest

from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.report_metrics import PUNKT_DIR, ROUGE_BOOTSTRAP_SEED, evaluate_reports, word_tokens

LONG_REF = ("FINDINGS: PA and lateral views of the chest were obtained. The lungs are well expanded. "
            "There is no focal consolidation. The cardiomediastinal silhouette is within normal limits. "
            "Median sternotomy wires are intact. Surgical clips project over the left upper quadrant. "
            "The osseous structures are diffusely demineralized. Degenerative changes are noted in the "
            "thoracic spine. There is no free air under the diaphragm. The visualized upper abdomen is "
            "unremarkable. Compared with the prior study, there has been no significant interval change.\n"
            "IMPRESSION: Large right pleural effusion with compressive atelectasis.")  # decisive sentence after char 512
CASES = [
    ("No acute cardiopulmonary process.", "No acute cardiopulmonary process."),
    ("Dr. Smith was notified of a 2.5 cm nodule in the right upper lobe. No pneumothorax.",
     "A 2.4 cm nodule in the right upper lobe. Findings were discussed with Dr. Jones at 10:30 a.m. on the phone."),
    ("There is approx. 3 mm of apical pleural thickening. Heart size is normal.",
     "Approximately 3 mm apical pleural thickening, unchanged. The heart size is normal."),
    ("", "Small left pleural effusion. Mild cardiomegaly."),
    ("Moderate cardiomegaly. Mild pulmonary edema, e.g. interstitial markings are increased.",
     "Moderate cardiomegaly with mild interstitial pulmonary edema."),
    ("ET tube terminates 4.5 cm above the carina. NG tube is in the stomach. Lines unchanged.",
     "The endotracheal tube tip is 5 cm above the carina. Enteric tube courses below the diaphragm."),
    ("Patient is s/p CABG. Sternal wires are intact (unchanged). No effusion vs. small effusion on the left.",
     "Status post CABG with intact sternal wires. Possible small left effusion."),
    ("Low lung volumes. Bibasilar opacities may reflect atelectasis; pneumonia can't be excluded.",
     "Low lung volumes with bibasilar atelectasis. Superimposed pneumonia cannot be excluded."),
    ("Right-sided PICC ends in the mid SVC.\nNo pneumothorax. \"Stable\" appearance of the chest...",
     "Right PICC tip in the mid SVC. No pneumothorax."),
    ("Lungs are clear. No pleural effusion or pneumothorax. The cardiomediastinal silhouette is normal.",
     LONG_REF),
    ("Large right pleural effusion. St. Mary's Hosp. records reviewed. Compare w/ prior from 01.02.2019.",
     "Large right pleural effusion, increased since 01/02/2019. Mr. Brown's prior films reviewed."),
    ("Fracture of the left 5th rib. The rib fx is acute. No PTX.",
     "Acute fracture of the left fifth rib without pneumothorax."),
    ("Mild vascular congestion. Size of heart: upper limits of normal (approx. 1.5x). Etc.",
     "Mild pulmonary vascular congestion. Heart size is at the upper limits of normal."),
]
EMPTY = 3  # the index of the empty prediction
# CheXbert class codes per report in the authors' condition order (HEAD_ORDER): 0 blank,
# 1 positive, 2 negative, 3 uncertain. Drawn at random once (numpy default_rng(7)).
PRED_ROWS = ["10030211010030", "01321300100000", "10000010002001", "02110002010000", "20311110000030", "10210233100010", "21100002000000",
             "00310020110020", "03022002012010", "00003100303000", "11020300030010", "13000003201010", "03011000221030"]
REF_ROWS = ["10030211010030", "00001202202000", "11011220122001", "01300010001000", "00000021002000", "03002100201010", "21000200012000",
            "11332201022000", "00200010230020", "01230030010001", "02000001003031", "00000002001001", "01002200033031"]
THEIR_NEGATIVE = {
    "macro_f1": 0.23390022674938218, "micro_f1": 0.2816901408442769, "f1_top5_macro": 0.2615873015782813,
    "f1_top5_micro": 0.27586206896361476, "f1_enlarged_cardiomediastinum": 0.4999999999875, "f1_cardiomegaly": 0.22222222221728394,
    "f1_lung_opacity": 0.0, "f1_lung_lesion": 0.0, "f1_edema": 0.399999999984,
    "f1_consolidation": 0.0, "f1_pneumonia": 0.3333333333222222, "f1_atelectasis": 0.399999999984,
    "f1_pneumothorax": 0.0, "f1_pleural_effusion": 0.28571428570612245, "f1_pleural_other": 0.399999999984,
    "f1_fracture": 0.0, "f1_support_devices": 0.399999999984, "f1_no_finding": 0.3333333333222222,
}
THEIR_POSITIVE = {
    "macro_f1": 0.32919818276161716, "micro_f1": 0.38461538461464495, "f1_top5_macro": 0.26534798534158377,
    "f1_top5_micro": 0.2926829268278406, "f1_enlarged_cardiomediastinum": 0.4999999999875, "f1_cardiomegaly": 0.30769230768757394,
    "f1_lung_opacity": 0.5714285714122449, "f1_lung_lesion": 0.399999999992, "f1_edema": 0.3333333333222222,
    "f1_consolidation": 0.0, "f1_pneumonia": 0.24999999999375, "f1_atelectasis": 0.28571428570612245,
    "f1_pneumothorax": 0.0, "f1_pleural_effusion": 0.399999999992, "f1_pleural_other": 0.4999999999875,
    "f1_fracture": 0.0, "f1_support_devices": 0.7272727272595041, "f1_no_finding": 0.3333333333222222,
}
# Their BLEU skips the empty prediction (mean over 12); their ROUGE_L bootstraps all 13 (seed 42).
THEIR_NLP = {"BLEU1": 0.46997473546008606, "BLEU2": 0.35212367322935817, "BLEU3": 0.29089745723556365,
             "BLEU4": 0.23672809425575017, "ROUGE_L": 0.5053099033944282}
THEIR_CHEXBERT_INPUT = LONG_REF[:512]  # what their CheXbert.forward tokenised for LONG_REF (checked equal there)
HEAD_ORDER = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
              "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices", "No Finding")
PUNKT_SHA256 = {
    "abbrev_types.txt": "92a3e070f43d9b4c5534758ca40ad7343b04e7e29bfe0c2eb658a39445a4f779",
    "collocations.tab": "8e2da1225e4dd2cc9dba261ee231ccb134859e21b46006e7f472c5ee269af0cf",
    "ortho_context.tab": "4bbcca25ed3d3f06c02402abf8419b9f033b8adc06e7b482eca4e45f81a5dc4c",
    "sent_starters.txt": "f3f8535483e1dba487241b764945168123bca3209a9645e59acd1225dc76edac",
}


def our_labels(code: str) -> list:
    """An authors' class-code row -> our label row (CHEXPERT_FINDINGS order, 1/0/-1/None)."""
    by_name = {name: {"0": None, "1": 1, "2": 0, "3": -1}[c] for name, c in zip(HEAD_ORDER, code)}
    return [by_name[name] for name in CHEXPERT_FINDINGS]


class TableLabeler:
    """A labeller that looks each text up, as the authors' fake network did; it records what it saw."""

    name = "table"

    def __init__(self):
        self.table, self.seen = {}, []
        for (p, r), pc, rc in zip(CASES, PRED_ROWS, REF_ROWS):
            self.table[p.strip()[:512]], self.table[r.strip()[:512]] = our_labels(pc), our_labels(rc)

    def __call__(self, texts):
        self.seen += texts
        return [self.table[t] for t in texts]


def sides(cases=CASES):
    return {str(i): p for i, (p, _) in enumerate(cases)}, {str(i): r for i, (_, r) in enumerate(cases)}


@pytest.fixture(scope="module")
def result():
    return evaluate_reports(*sides(), TableLabeler())


@pytest.mark.parametrize("policy, theirs", [("negative", THEIR_NEGATIVE), ("positive", THEIR_POSITIVE)])
def test_clinical_f1_matches_theirs(result, policy, theirs):
    ours = result[f"uncertain_as_{policy}"]
    # theirs carry +1e-10 in every denominator: equal to 1e-9
    for mine, their in (("micro_f1_14", "micro_f1"), ("macro_f1_14", "macro_f1"), ("micro_f1_5", "f1_top5_micro"), ("macro_f1_5", "f1_top5_macro")):
        assert ours[mine] == pytest.approx(theirs[their], abs=1e-9), mine
    for name in CHEXPERT_FINDINGS:
        assert ours["f1_" + name] == pytest.approx(theirs["f1_" + name.lower().replace(" ", "_")], abs=1e-9), name


def test_bleu_and_rouge_match_theirs(result):
    n = len(CASES)
    for k in range(1, 5):  # the empty prediction counts as 0 here, and is skipped by them
        assert result[f"bleu{k}"] == pytest.approx(THEIR_NLP[f"BLEU{k}"] * (n - 1) / n, abs=1e-6)
    assert result["rouge_l"] == pytest.approx(THEIR_NLP["ROUGE_L"], abs=1e-12)
    assert result["rouge_l_ci95"][0] < result["rouge_l"] < result["rouge_l_ci95"][1]
    assert result["rouge_l_mean"] != result["rouge_l"]  # the bootstrap mid is not the plain mean
    no_empty = [c for i, c in enumerate(CASES) if i != EMPTY]
    alone = evaluate_reports(*sides(no_empty), TableLabeler())
    for k in range(1, 5):  # on the same texts, equal to theirs
        assert alone[f"bleu{k}"] == pytest.approx(THEIR_NLP[f"BLEU{k}"], abs=1e-6)


def test_empty_prediction_is_scored_and_counted(result, caplog):
    assert result["n"] == len(CASES) and result["n_empty_predictions"] == 1 and result["empty_prediction_ids"] == [str(EMPTY)]
    labeler = TableLabeler()
    with caplog.at_level(logging.WARNING):
        evaluate_reports(*sides(), labeler)
    assert "" in labeler.seen  # labelled as an empty text
    assert "1 empty prediction(s) scored" in caplog.text


def test_empty_reference_is_left_out_and_reported(caplog):
    preds, refs = sides()
    refs["0"] = "   "
    with caplog.at_level(logging.WARNING):
        r = evaluate_reports(preds, refs, TableLabeler())
    assert r["n"] == len(CASES) - 1 and r["n_empty_references"] == 1 and "empty reference" in caplog.text


def test_protocol_decides_what_the_labeller_reads(result):
    labeler = TableLabeler()
    evaluate_reports(*sides(), labeler)
    assert THEIR_CHEXBERT_INPUT in labeler.seen and LONG_REF not in labeler.seen
    assert result["protocol"]["name"] == "release" and result["protocol"]["label_chars"] == 512
    assert result["protocol"]["bleu_weights"][2] == [0.33, 0.33, 0.33, 0]
    labeler.table[LONG_REF] = labeler.table[LONG_REF[:512]]
    full = evaluate_reports(*sides(), labeler, protocol="full-text")
    assert LONG_REF in labeler.seen and full["protocol"]["label_chars"] is None
    with pytest.raises(ValueError, match="release"):
        evaluate_reports(*sides(), labeler, protocol="paper")


def test_rouge_bootstrap_is_seeded_and_leaves_numpy_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = evaluate_reports(*sides(), TableLabeler())["rouge_l"]
    assert np.random.rand() == expected  # the global generator is where it was
    assert evaluate_reports(*sides(), TableLabeler())["rouge_l"] == a and ROUGE_BOOTSTRAP_SEED == 42


def test_shipped_punkt_data_is_nltks():
    import hashlib

    for name, digest in PUNKT_SHA256.items():
        assert hashlib.sha256((PUNKT_DIR / name).read_bytes()).hexdigest() == digest, name


def test_word_tokens_equal_nltk_word_tokenize(tmp_path, monkeypatch):
    """The real nltk.word_tokenize, reading the same punkt_tab files through NLTK's own data lookup."""
    import nltk
    from nltk.tokenize import _get_punkt_tokenizer

    english = tmp_path / "tokenizers" / "punkt_tab" / "english"
    shutil.copytree(PUNKT_DIR, english)
    for f in english.iterdir():
        os.chmod(f, 0o644)  # NLTK refuses group- or world-writable data files
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    _get_punkt_tokenizer.cache_clear()
    try:
        texts = [t.strip() for case in CASES for t in case if t.strip()]
        texts += ["Pt. is a 67 y.o. male. Hx of CHF, s/p AVR.", "Tip at T4-T5. Compare to 3/4/2019...", "He said \"no\"; i.e. clear."]
        for text in texts:
            assert word_tokens(text) == nltk.word_tokenize(text), text
        assert word_tokens("There is approx. 3 mm of thickening.")[:5] == ["There", "is", "approx", ".", "3"]
    finally:
        _get_punkt_tokenizer.cache_clear()
