"""Report metrics on hand-computed tables, and the `unix eval` report commands end to end."""

import csv
import json

import numpy as np
import pytest

from unix.cli import main
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.report_metrics import clinical_f1, evaluate_reports, positives, word_tokens

N = len(CHEXPERT_FINDINGS)
CARDIO, EFFUSION, EDEMA, PTX = (CHEXPERT_FINDINGS.index(n) for n in ("Cardiomegaly", "Pleural Effusion", "Edema", "Pneumothorax"))


def rows(*entries):
    """Each entry: {index: label}; others blank."""
    out = []
    for e in entries:
        r = [None] * N
        for i, v in e.items():
            r[i] = v
        out.append(r)
    return out


def test_f1_variants_by_hand():
    # 3 reports. Cardiomegaly: ref 1,1,0 / pred 1,0,1 -> TP1 FP1 FN1 -> F1 0.5
    # Effusion: ref -1,1,None / pred 1,1,1 -> as negative: TP1 FP2 FN0 -> 0.5; as positive: TP2 FP1 FN0 -> 0.8
    # Pneumothorax: never positive -> F1 0; Edema: ref 1 (r3) / pred None -> FN1 -> 0
    ref = rows({CARDIO: 1, EFFUSION: -1}, {CARDIO: 1, EFFUSION: 1}, {CARDIO: 0, EDEMA: 1})
    pred = rows({CARDIO: 1, EFFUSION: 1}, {CARDIO: 0, EFFUSION: 1}, {CARDIO: 1, EFFUSION: 1})
    neg = clinical_f1(positives(pred, "negative"), positives(ref, "negative"))
    pos = clinical_f1(positives(pred, "positive"), positives(ref, "positive"))
    assert neg["f1_Cardiomegaly"] == pytest.approx(0.5) and neg["f1_Pleural Effusion"] == pytest.approx(0.5)
    assert pos["f1_Pleural Effusion"] == pytest.approx(0.8) and neg["f1_Pneumothorax"] == 0.0 and neg["f1_Edema"] == 0.0
    # micro over 14 (negative): TP 1+1=2, FP 1+2=3, FN 1+0+1=2 -> 2/(2+2.5) = 0.4444
    assert neg["micro_f1_14"] == pytest.approx(2 / 4.5)
    # the 5 (atelectasis, cardiomegaly, edema, consolidation, effusion): same counts here
    assert neg["micro_f1_5"] == pytest.approx(2 / 4.5)
    assert neg["macro_f1_5"] == pytest.approx((0 + 0.5 + 0 + 0 + 0.5) / 5)
    assert neg["macro_f1_14"] == pytest.approx((0.5 + 0.5) / 14)
    assert pos["micro_f1_14"] == pytest.approx(3 / (3 + 0.5 * (2 + 2)))


def test_identical_reports_score_one():
    text = "FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Small left effusion."
    from unix.eval.rule_labeler import RuleLabeler

    other = "FINDINGS: The heart is moderately enlarged. IMPRESSION: Moderate cardiomegaly."
    r = evaluate_reports({"a": text, "b": other}, {"a": text, "b": other}, RuleLabeler())
    assert r["n"] == 2 and r["bleu4"] == pytest.approx(1.0) and r["corpus_bleu4"] == pytest.approx(1.0)
    assert r["rouge_l"] == pytest.approx(1.0)
    assert r["uncertain_as_negative"]["micro_f1_14"] == pytest.approx(1.0)
    worse = evaluate_reports({"a": "No effusion."}, {"a": text}, RuleLabeler())
    assert worse["bleu1"] < 0.5 and worse["uncertain_as_negative"]["micro_f1_14"] == 0.0


def test_word_tokens_keep_numbers_and_split_punctuation():
    assert word_tokens("A 3.5 cm mass, left-sided. Dr. Lee agreed.") == ["A", "3.5", "cm", "mass", ",", "left-sided", ".", "Dr.", "Lee", "agreed", "."]


def write_csv(path, rows_):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "report"])
        w.writeheader()
        w.writerows(rows_)


def test_commands_end_to_end(tmp_path, capsys):
    write_csv(tmp_path / "ref.csv", [{"id": "1", "report": "Moderate cardiomegaly. No effusion."},
                                     {"id": "2", "report": "Small right pneumothorax."},
                                     {"id": "3", "report": "Lungs are clear."}])
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "1", "report": "The heart is enlarged. No pleural effusion."},
        {"id": "2", "report": "No pneumothorax."},
        {"id": "9", "report": "Possible edema."},
        {"id": "3", "report": ""},
    ]) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "reports", "--pred", str(tmp_path / "pred.jsonl"), "--ref", str(tmp_path / "ref.csv"), "--out", str(out)]) == 0
    io = capsys.readouterr()
    assert "without a reference, e.g. 9" in io.err and "without a prediction" not in io.err
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["n_empty_predictions"] == 1 and "1 empty prediction(s) scored" in result["problems"][-1]
    # cardiomegaly TP; pneumothorax FN; "No pneumothorax." alone makes No Finding 1: FP; the empty
    # prediction is labelled as an empty text, which the rule labeller calls No Finding, as is
    # "Lungs are clear.": TP -> 2 / (2 + 0.5 * 2)
    assert result["uncertain_as_negative"]["micro_f1_14"] == pytest.approx(2 / 3)
    assert main(["eval", "reports", "--pred", str(tmp_path / "pred.jsonl"), "--ref", str(tmp_path / "ref.csv"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert "micro_f1_14" in io.out

    labels = tmp_path / "labels.csv"
    assert main(["eval", "label", "--in", str(tmp_path / "ref.csv"), "--out", str(labels)]) == 0
    got = list(csv.DictReader(open(labels)))
    assert list(got[0]) == ["id", *CHEXPERT_FINDINGS]
    assert got[0]["Cardiomegaly"] == "1" and got[0]["Pleural Effusion"] == "0" and got[1]["Pneumothorax"] == "1"
    assert got[2]["No Finding"] == "1" and got[0]["No Finding"] == ""
    assert main(["eval", "label", "--in", str(tmp_path / "ref.csv"), "--out", str(labels), "--overwrite", "--labeler", "chexbert",
                 "--weights-dir", str(tmp_path)]) == 2
    assert "chexbert.pth" in capsys.readouterr().err


def test_positives_policy():
    lab = rows({CARDIO: -1})
    assert not positives(lab, "negative")[0, CARDIO] and positives(lab, "positive")[0, CARDIO]
    assert np.array_equal(positives(rows({}), "positive"), np.zeros((1, N), bool))
