"""RadGraph F1: our partial-level scoring against radgraph's own, and its place in `evaluate_reports`."""

import io
import tarfile

import pytest

from unix.errors import UserError
from unix.eval.radgraph import entity_set, model_folder, partial_reward, radgraph_f1
from unix.eval.report_metrics import evaluate_reports
from unix.eval.rule_labeler import RuleLabeler


def ann(*entities):
    """entities: (tokens, label, [relation targets])."""
    return {"entities": {str(i): {"tokens": t, "label": lab, "relations": [["located_at", str(r)] for r in rel]}
                         for i, (t, lab, rel) in enumerate(entities)}}


REF = ann(("effusion", "OBS-DP", [1]), ("pleural", "ANAT-DP", []), ("heart", "ANAT-DP", []), ("enlarged", "OBS-DP", [2]))
HYP = ann(("effusion", "OBS-DP", []), ("pleural", "ANAT-DP", []), ("enlarged", "OBS-DP", [0]))
PAIRS = [(HYP, REF), (REF, REF), (ann(), REF), (ann(("clear", "OBS-DA", [])), ann(("lungs", "ANAT-DP", [])))]


def test_partial_reward_by_hand():
    # "effusion" has a relation in REF but not in HYP, so it counts as a different entity
    assert entity_set(HYP) == {("effusion", "OBS-DP"), ("pleural", "ANAT-DP"), ("enlarged", "OBS-DP", True)}
    p, r, f = partial_reward(HYP, REF)
    assert (p, r) == pytest.approx((2 / 3, 2 / 4)) and f == pytest.approx(2 * p * r / (p + r))
    assert partial_reward(REF, REF) == (1.0, 1.0, 1.0)
    assert partial_reward(ann(), REF) == (0.0, 0.0, 0.0)
    mean = radgraph_f1([h for h, _ in PAIRS], [r for _, r in PAIRS])
    assert mean["f1-radgraph"] == pytest.approx((f + 1.0) / 4)
    with pytest.raises(ValueError):
        radgraph_f1([HYP], [])


def test_matches_radgraph_package():
    rewards = pytest.importorskip("radgraph.rewards")
    for hyp, ref in PAIRS:
        assert partial_reward(hyp, ref)[2] == pytest.approx(rewards.compute_reward(hyp, ref, "partial"))


def test_evaluate_reports_uses_the_annotator():
    # a stand-in annotator: one entity per word, so RadGraph F1 becomes word-set F1
    def annotate(reports):
        return [ann(*((w, "OBS-DP", []) for w in r.lower().rstrip(".").split())) for r in reports]

    preds = {"a": "Small effusion.", "b": "Lungs clear."}
    refs = {"a": "Small right effusion.", "b": "Lungs clear."}
    result = evaluate_reports(preds, refs, RuleLabeler(), annotate)
    p, r = 1.0, 2 / 3
    assert result["f1-radgraph"] == pytest.approx((2 * p * r / (p + r) + 1.0) / 2)
    assert not any(s.startswith("radgraph") for s in result["skipped"])
    result = evaluate_reports(preds, refs, RuleLabeler(), None, "radgraph: no model here")
    assert "f1-radgraph" not in result and "radgraph: no model here" in result["skipped"]


def test_model_folder_extracts_the_archive_once(tmp_path):
    with pytest.raises(UserError, match="no RadGraph model"):
        model_folder(tmp_path)
    with tarfile.open(tmp_path / "radgraph.tar.gz", "w:gz") as tar:
        for name in ("model/config.json", "model/weights.th", "model/vocabulary/ner_labels.txt"):
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = model_folder(tmp_path)
    assert folder == tmp_path / "radgraph" and (folder / "vocabulary" / "ner_labels.txt").is_file()
    (tmp_path / "radgraph.tar.gz").unlink()
    assert not (tmp_path / ".radgraph.extracting").exists()
    assert model_folder(tmp_path) == folder  # extracted once, found again without the archive


def test_cli_says_radgraph_is_skipped(tmp_path, capsys):
    from unix.cli import main

    (tmp_path / "r.csv").write_text("id,report\n1,Small effusion.\n")
    assert main(["eval", "reports", "--pred", str(tmp_path / "r.csv"), "--ref", str(tmp_path / "r.csv"),
                 "--radgraph-dir", str(tmp_path / "none")]) == 0
    assert f"radgraph: no model in {tmp_path / 'none'}" in capsys.readouterr().out


def test_empty_prediction_is_not_annotated_and_scores_zero():
    seen = []

    def annotate(reports):
        seen.extend(reports)
        return [ann(*((w, "OBS-DP", []) for w in r.lower().rstrip(".").split())) for r in reports]

    result = evaluate_reports({"a": "Lungs clear.", "b": "  "}, {"a": "Lungs clear.", "b": "Small effusion."}, RuleLabeler(), annotate)
    assert "" not in seen and "  " not in seen  # the authors' F1RadGraph gives an empty report (0, 0, 0) unannotated
    assert result["f1-radgraph"] == pytest.approx((1.0 + 0.0) / 2) and result["n_empty_predictions"] == 1
