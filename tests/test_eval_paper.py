"""`unix eval paper` on a MIMIC-shaped fixture tree: the table, resuming, and the end-to-end path
ingest -> stage-1 training -> paper table."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimic_fixture import build_mimic_tree
from unix.cli import main
from unix.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "weights" / "phantom-tiny"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_mimic_tree(tmp_path_factory.mktemp("mimic"), n_studies=30, seed=0)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """Enough test-split studies for one shard of image metrics (k = 5 needs 7 distinct prompts)."""
    return build_mimic_tree(tmp_path_factory.mktemp("mimic_big"), n_studies=50, seed=1)


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
    """A metric-weights folder with a tiny random RAD-DINO (real loading code, transformers layout)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("metric_weights")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56)
    Dinov2Model(config).save_pretrained(folder / "rad-dino")
    return folder


def paper_args(tree, weights, out, metric_weights, *extra):
    return ["eval", "paper", "--weights", str(weights), "--mimic", str(tree["root"]), "--test-file", str(tree["test_json"]),
            "--gen-prompts", str(tree["prompts_csv"]), "--sizes", "256", "--image-shards", "1", "--device", "cpu",
            "--metric-weights", str(metric_weights), "--max-new-tokens", "32", "--out", str(out), "-q", *extra]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def table(out: Path) -> dict:
    return {(r["section"], r["metric"]): r for r in json.loads((out / "paper.json").read_text())["table"]}


def test_paper_table_then_a_resume_recomputes_nothing_that_is_done(tree, metric_weights, tmp_path, monkeypatch):
    out = tmp_path / "paper"
    args = paper_args(tree, DEMO, out, metric_weights, "--limit", "2")
    assert main(args) == 0
    rows = table(out)
    assert len((out / "reports.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "images_256").glob("*.png")) == ["SyntheticImg_0.png", "SyntheticImg_1.png"]
    f1 = rows[("reports", "Micro F1-14 (unc. as neg.)")]
    assert f1["paper"] == 53.6 and f1["ours"] is not None and f1["delta"] == pytest.approx(f1["ours"] - 53.6)
    assert rows[("images 256 px", "FD-RadDino")]["ours"] is None  # 2 images cannot fill a shard with k = 5 ...
    notes = json.loads((out / "paper.json").read_text())["notes"]
    assert any("skipped: image metrics at 256 px" in n for n in notes)  # ... and the table says so
    assert any("(--limit)" in n for n in notes) and any("rule labeller" in n for n in notes)
    assert "| Micro F1-14 (unc. as neg.) | 53.6 |" in (out / "paper.md").read_text()
    # the authors' own file formats, so their scripts can score the same outputs
    assert (out / "understanding_results.csv").read_text().startswith("Image Path,Report Impression,Ground Truth")

    # a finished run is rescored without loading the model
    import unix.infer

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every output exists")

    monkeypatch.setattr(unix.infer, "load_pipeline", no_model)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images_256").iterdir()}
    assert main(args) == 0
    assert table(out) == rows
    assert {p: p.stat().st_mtime_ns for p in (out / "images_256").iterdir()} == stamps
    monkeypatch.undo()

    # an interrupted run (a torn last line, a missing image) redoes exactly those, with the same outputs
    lines = (out / "reports.jsonl").read_text().splitlines()
    (out / "reports.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    victim = out / "images_256" / "SyntheticImg_1.png"
    before = pixels(victim)
    victim.unlink()
    assert main(args) == 0
    assert (out / "reports.jsonl").read_text().splitlines() == lines
    # drawn alone instead of in a batch of two: the same seed, equal up to float rounding of the batch
    assert np.abs(pixels(victim) - before).max() <= 1
    assert table(out) == rows


def test_paper_refuses_to_mix_the_outputs_of_two_models(tree, metric_weights, tmp_path):
    out = tmp_path / "paper"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"weights": "/somewhere/else", "seed": 0}))
    with pytest.raises(UserError, match="other weights"):
        main(["-v", *paper_args(tree, DEMO, out, metric_weights)])
    assert not (out / "reports.jsonl").exists()


def test_paper_table_with_image_metrics(big_tree, metric_weights, tmp_path):
    from test_biovil import tiny_folder  # a tiny BioViL-T with the public checkpoints' tensor names

    weights = tiny_folder(tmp_path).parent  # tmp_path/weights/biovil-t
    (weights / "rad-dino").symlink_to(metric_weights / "rad-dino")
    out = tmp_path / "paper"
    assert main(paper_args(big_tree, DEMO, out, weights)) == 0
    rows = table(out)
    n_tests = len(json.loads(big_tree["test_json"].read_text()))
    assert len((out / "reports.jsonl").read_text().splitlines()) == n_tests
    assert len(list((out / "images_256").glob("SyntheticImg_*.png"))) == n_tests
    for metric in ("FD-RadDino", "KD-RadDino", "Precision", "Recall", "Density", "Coverage"):  # the tiny RAD-DINO's features
        assert rows[("images 256 px", metric)]["ours"] is not None, metric
    image = json.loads((out / "paper.json").read_text())["results"]["images_256"]
    assert image["protocol"]["name"] == "release"
    align = image["alignment"]  # the tiny text model reads 24 tokens: longer prompts are reported, the rest scored
    assert align["n"] > 0 and align["n"] + align["errors"] == n_tests and -1 <= align["score"] <= 1
    assert rows[("images 256 px", "Alignment")]["ours"] == align["score"]
    for value in image["metrics"].values():  # the authors' protocol: 3-decimal numbers
        assert value == round(value, 3)


def test_ingest_train_and_paper_table_end_to_end(big_tree, metric_weights, tmp_path):
    """The real-data path on the fixture: MIMIC ingest -> a few stage-1 steps from the demo model ->
    the paper table of the trained folder."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    assert main(["data", "mimic", "--root", str(big_tree["root"]), "--reports", str(big_tree["reports"]), "--out", str(shards)]) == 0
    config = Path(__file__).resolve().parents[1] / "configs" / "train" / "phantom_stage1.yaml"
    assert main(["train", str(config), f"data.shards={shards}", f"init={DEMO}", "model=phantom", "steps=2", f"out={run}",
                 "save_every=2", "optim.warmup_steps=1"]) == 0
    out = tmp_path / "paper"
    assert main(paper_args(big_tree, run / "final", out, metric_weights)) == 0
    rows = table(out)
    assert rows[("reports", "Macro F1-5 (unc. as pos.)")]["ours"] is not None
    assert rows[("images 256 px", "FD-RadDino")]["ours"] is not None
    record = json.loads((out / "run.json").read_text())
    assert record["weights"] == str((run / "final").resolve())
