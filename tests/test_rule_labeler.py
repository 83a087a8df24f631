"""The rule labeller on realistic radiology phrasing, and on the phantom generator's reports."""

import math

import pytest

from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.rule_labeler import clauses, label_report

CASES = [
    # (sentence, {observation: expected label}); unlisted observations must be blank (No Finding aside)
    ("No pneumothorax.", {"Pneumothorax": 0}),
    ("There is no pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Small left pleural effusion.", {"Pleural Effusion": 1}),
    ("Bilateral pleural effusions, right greater than left.", {"Pleural Effusion": 1}),
    ("No right pneumothorax.", {"Pneumothorax": 0}),
    ("Possible small left effusion.", {"Pleural Effusion": -1}),
    ("Left basilar opacity may represent atelectasis or pneumonia.", {"Lung Opacity": -1, "Atelectasis": -1, "Pneumonia": -1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Cannot exclude a small pneumothorax.", {"Pneumothorax": -1}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("Moderate cardiomegaly.", {"Cardiomegaly": 1}),
    ("The cardiomediastinal silhouette is normal.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    ("Mild pulmonary vascular congestion.", {"Edema": 1}),
    ("No pulmonary edema.", {"Edema": 0}),
    ("Interstitial edema has resolved.", {"Edema": 0}),
    ("Right lower lobe consolidation, consistent with pneumonia.", {"Consolidation": 1, "Pneumonia": 1}),
    ("Patchy airspace opacity in the right upper lobe, likely atelectasis.", {"Lung Opacity": -1, "Atelectasis": -1}),
    ("A 1.2 cm nodule in the left upper lobe.", {"Lung Lesion": 1}),
    ("No suspicious pulmonary nodules or masses.", {"Lung Lesion": 0}),
    ("Acute fracture of the right 6th rib.", {"Fracture": 1}),
    ("No displaced rib fracture.", {"Fracture": 0}),
    ("Endotracheal tube terminates 4 cm above the carina.", {"Support Devices": 1}),
    ("Right PICC line tip in the mid SVC.", {"Support Devices": 1}),
    ("Left chest wall pacemaker with leads in the right atrium and ventricle.", {"Support Devices": 1}),
    ("Nasogastric tube has been removed.", {"Support Devices": 1}),
    ("Apical pleural thickening on the left.", {"Pleural Other": 1}),
    ("Calcified pleural plaques.", {"Pleural Other": 1}),
    ("Bibasilar atelectasis.", {"Atelectasis": 1}),
    ("Lungs are clear without consolidation.", {"Consolidation": 0}),
    ("No evidence of pneumonia.", {"Pneumonia": 0}),
    ("Small left effusion, but no pneumothorax.", {"Pleural Effusion": 1, "Pneumothorax": 0}),
    ("No pneumothorax; small right effusion is unchanged.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Right effusion is possible, however there is no consolidation.", {"Pleural Effusion": -1, "Consolidation": 0}),
    ("Opacity at the left base could reflect infection.", {"Lung Opacity": -1, "Pneumonia": -1}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0}),
    ("Free of focal airspace disease.", {"Lung Opacity": 0}),
    ("Heart size is top normal.", {"Cardiomegaly": 0}),
]


@pytest.mark.parametrize("sentence, expected", CASES)
def test_realistic_sentences(sentence, expected):
    got = dict(zip(CHEXPERT_FINDINGS, label_report(sentence)))
    for name in CHEXPERT_FINDINGS:
        if name == "No Finding":
            continue
        assert got[name] == expected.get(name), (sentence, name, got[name])


def test_no_finding_rule():
    def nf(r):
        return label_report(r)[0]

    assert nf("No acute cardiopulmonary process. No pneumothorax.") == 1
    assert nf("Endotracheal tube in place. Lungs are clear.") == 1  # devices alone are not a finding
    assert nf("Possible small effusion.") is None
    assert nf("Cardiomegaly.") is None


def test_clause_scope():
    assert clauses("FINDINGS: A, but B; C. IMPRESSION: D") == ["a", "b", "c", "d"]
    assert clauses("A 3.5 cm mass.") == ["a 3.5 cm mass"]


def test_recovers_the_phantom_labels():
    from unix.data.phantom import generate

    wrong = 0
    for i in range(500):
        s = generate(7, i)
        ref = [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v) for v in (s.labels[k] for k in CHEXPERT_FINDINGS)]
        wrong += label_report(s.report) != ref
    assert wrong <= 5, f"{wrong} of 500 phantom reports mislabelled"
