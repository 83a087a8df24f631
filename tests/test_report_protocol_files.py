"""`unix eval reports` on the authors' files: their generated-report CSV and their test JSON."""

import csv
import json

import pytest

from unix.cli import main

ROWS = [  # Image Path, Report Impression (generated), Ground Truth
    ("files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg", "Moderate cardiomegaly. No effusion.", "Moderate cardiomegaly. No pleural effusion."),
    ("files/p10/p10000032/s53189527/2a2277a9-b0ded155.jpg", "", "Small right pneumothorax."),
    ("files/p10/p10000764/s57375967/096052b7-d256dc40.jpg", "Lungs are clear.", "Lungs are clear. No pneumothorax."),
]


def write_report_csv(path, rows=ROWS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Path", "Report Impression", "Ground Truth"])
        w.writerows(rows)


def write_test_json(path, refs):
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>Write the findings."},
                                              {"role": "assistant", "content": ref}], "images": [image]} for image, ref in refs]))


def run(tmp_path, *argv):
    out = tmp_path / "r.json"
    code = main(["eval", "reports", *argv, "--out", str(out), "--overwrite", "--radgraph-dir", str(tmp_path / "none")])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_report_csv_alone_holds_both_sides(tmp_path, capsys):
    write_report_csv(tmp_path / "understanding_results.csv")
    code, result = run(tmp_path, "--pred", str(tmp_path / "understanding_results.csv"))
    assert code == 0 and result["n"] == 3
    assert result["n_empty_predictions"] == 1 and result["empty_prediction_ids"] == ["2a2277a9-b0ded155"]  # ids: image stems
    assert result["protocol"]["name"] == "release" and 0 < result["bleu1"] < 1
    assert "1 empty predictions scored" in capsys.readouterr().out


def test_test_json_as_references(tmp_path):
    write_report_csv(tmp_path / "gen.csv")
    # the test file disagrees with the CSV's Ground Truth on the first item: --ref wins
    write_test_json(tmp_path / "test_data.json", [(ROWS[0][0], "Lungs are clear."), (ROWS[2][0], ROWS[2][2])])
    _, from_csv = run(tmp_path, "--pred", str(tmp_path / "gen.csv"))
    code, from_json = run(tmp_path, "--pred", str(tmp_path / "gen.csv"), "--ref", str(tmp_path / "test_data.json"))
    assert code == 0 and from_json["n"] == 2 and from_json["bleu1"] != from_csv["bleu1"]
    assert any("prediction id(s) without a reference, e.g. 2a2277a9-b0ded155" in p for p in from_json["problems"])
    # our own JSONL of predictions keyed by the image stem joins the same test file
    (tmp_path / "pred.jsonl").write_text("\n".join(json.dumps({"id": image.split("/")[-1][:-4], "report": text}) for image, text, _ in ROWS))
    code, ours = run(tmp_path, "--pred", str(tmp_path / "pred.jsonl"), "--ref", str(tmp_path / "test_data.json"), "--protocol", "full-text")
    assert code == 0 and ours["n"] == 2 and ours["bleu1"] == pytest.approx(from_json["bleu1"])
    assert ours["protocol"]["label_chars"] is None


def test_our_table_needs_a_ref(tmp_path, capsys):
    (tmp_path / "pred.csv").write_text("id,report\n1,Lungs are clear.\n")
    assert main(["eval", "reports", "--pred", str(tmp_path / "pred.csv")]) == 2
    assert "--ref is needed" in capsys.readouterr().err


def test_empty_reference_in_the_csv_is_reported(tmp_path):
    rows = ROWS[:2] + [(ROWS[2][0], "Lungs are clear.", " ")]
    write_report_csv(tmp_path / "gen.csv", rows)
    code, result = run(tmp_path, "--pred", str(tmp_path / "gen.csv"))
    assert code == 0 and result["n"] == 2 and result["n_empty_references"] == 1
    assert any("reference is empty" in p for p in result["problems"])
