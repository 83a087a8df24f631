"""The embedded demo model (weights/phantom-tiny) loads and does its two jobs on the shipped examples."""

import json
from pathlib import Path

import numpy as np
import pytest

from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.rule_labeler import label_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHIPPED = ROOT / "weights" / "phantom-tiny"
pytestmark = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="weights/phantom-tiny not present")


def examples() -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (EXAMPLES / "prompts.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def pipe():
    from unix.infer.pipeline import load_pipeline

    return load_pipeline(None, device="cpu")  # the default is the shipped model


def test_default_weights_are_the_shipped_model(pipe):
    assert pipe.folder.resolve() == SHIPPED.resolve()


@pytest.mark.parametrize("name", ["cardiomegaly", "pleural_effusion"])
def test_report_names_the_main_finding(pipe, name):
    row = examples()[name]
    report = pipe.reports([str(EXAMPLES / f"{name}.png")])[0]
    labels = dict(zip(CHEXPERT_FINDINGS, label_report(report)))
    assert labels[row["main_finding"]] == 1, report


def test_generates_a_radiograph_shaped_image(pipe):
    from unix.infer.images import ImageSettings

    image = pipe.images([examples()["pleural_effusion"]["prompt"]], [0], ImageSettings(size=256, steps=10))[0]
    assert image.shape == (256, 256) and image.dtype == np.uint8
    assert 20 < image.mean() < 235 and image.std() > 10  # not blank, not noise-free grey
