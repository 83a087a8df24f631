"""CXR-Phantom: determinism, sizes, label convention, visible findings, shards, the CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from unix.data import phantom as ph
from unix.data.phantom_report import MAX_FINDING_SENTENCES, NEGATED_HEART, NEGATED_NP, write_report
from unix.data.shards import ShardWriter, count_rows, image_report_schema, iter_rows, shard_paths
from unix.errors import UserError

HEDGES = re.compile(r"Possible|cannot be excluded|Cannot exclude|Questionable|may represent|not excluded")


@pytest.fixture(scope="module")
def samples():
    return [ph.generate(0, i, 64) for i in range(300)]


def test_same_seed_same_bytes_and_subsets_regenerate():
    a = [ph.generate(3, i) for i in range(4)]
    b = [ph.generate(3, i) for i in reversed(range(4))][::-1]  # order and subset do not matter
    for x, y in zip(a, b):
        assert ph.encode_png(x.image) == ph.encode_png(y.image)
        assert (x.report, x.attributes) == (y.report, y.attributes)
        assert json.dumps(x.labels) == json.dumps(y.labels)
    other = ph.generate(4, 0)
    assert not np.array_equal(other.image, a[0].image) and other.id != a[0].id


def test_png_round_trips():
    img = ph.generate(0, 1).image
    assert img.shape == (256, 256) and img.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(ph.encode_png(img)))), img)


@pytest.mark.parametrize("size", [32, 48, 128])
def test_sizes_multiple_of_16(size):
    assert ph.generate(0, 0, size).image.shape == (size, size)


@pytest.mark.parametrize("size", [0, 16, 100, 250])
def test_bad_size_rejected(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        ph.generate(0, 0, size)


def test_labels_follow_chexpert_convention(samples):
    assert list(samples[0].labels) == list(ph.LABELS) and len(ph.LABELS) == 14
    for s in samples:
        for name, v in s.labels.items():
            assert math.isnan(v) or v in (1.0, 0.0, -1.0), (name, v)
        others = [v for k, v in s.labels.items() if k not in ("No Finding", "Support Devices")]
        abnormal = any(v in (1.0, -1.0) for v in others)
        if abnormal:  # No Finding is 1 or blank, never 0 or -1
            assert math.isnan(s.labels["No Finding"]), s.report
        else:
            assert s.labels["No Finding"] == 1.0, s.report
        if s.labels["Pneumonia"] in (1.0, -1.0):  # pneumonia is read from a drawn, reported opacity
            assert 1.0 in (s.labels["Consolidation"], s.labels["Lung Opacity"])


def test_reports_match_labels(samples):
    for s in samples:
        text = s.report
        assert text.startswith("FINDINGS: ") and text.count(" IMPRESSION: ") == 1
        findings = text.split(" IMPRESSION: ")[0]
        assert len(re.findall(r"\.(?:\s|$)", findings)) <= MAX_FINDING_SENTENCES + 1, text
        if any(v == -1.0 for v in s.labels.values()):
            assert HEDGES.search(text), text
        for name in s.attributes["negated"]:
            assert s.labels[name] == 0.0
            said = [NEGATED_NP.get(name, "")] + [p for k, ps in NEGATED_HEART.items() if name in k for p in ps]
            assert any(p and p.lower() in text.lower() for p in said), (name, text)
        for f in s.attributes["findings"]:
            assert s.labels[f["label"]] in (1.0, -1.0)


def test_prevalence(samples):
    normal = np.mean([s.labels["No Finding"] == 1.0 for s in samples])
    assert 0.2 < normal < 0.4
    per_abnormal = [sum(v in (1.0, -1.0) for k, v in s.labels.items() if k not in ("No Finding", "Support Devices"))
                    for s in samples if s.labels["No Finding"] != 1.0]
    assert np.mean(per_abnormal) > 1.8  # several findings per abnormal image
    for name in ph.LABELS:
        assert any(s.labels[name] == 1.0 for s in samples), name


def test_hedged_and_negated_phrasing():
    rng = np.random.default_rng(0)
    effusion = ph.Finding("Pleural Effusion", status=-1, side="left", severity="small", zone="lower")
    text, negated = write_report((effusion,), ("Pneumothorax",), rng)
    assert "small left pleural effusion" in text.lower() and HEDGES.search(text)
    assert negated == ("Pneumothorax",) and "pneumothorax" in text.lower()
    labels = ph.labels_of((effusion,), negated)
    assert labels["Pleural Effusion"] == -1.0 and labels["Pneumothorax"] == 0.0 and math.isnan(labels["No Finding"])
    devices_only = ph.labels_of((ph.Finding("Support Devices", kind="pacemaker"),), ())
    assert devices_only["No Finding"] == 1.0 and devices_only["Support Devices"] == 1.0


ANATOMY = ph.sample_anatomy(np.random.default_rng(123))
VISIBLE = [
    ph.Finding("Cardiomegaly", severity="moderate"), ph.Finding("Enlarged Cardiomediastinum", severity="moderate"),
    ph.Finding("Lung Opacity", side="right", zone="middle", seed=1),
    ph.Finding("Lung Lesion", side="left", zone="upper", size_cm=1.5, kind="nodule", seed=2),
    ph.Finding("Edema", side="bilateral", severity="mild"), ph.Finding("Consolidation", side="left", zone="lower", seed=3),
    ph.Finding("Pneumonia", side="right", zone="lower", seed=4),
    ph.Finding("Atelectasis", side="right", severity="mild", zone="lower", seed=5),
    ph.Finding("Pneumothorax", side="left", severity="small"),
    ph.Finding("Pleural Effusion", side="right", severity="small", zone="lower"),
    ph.Finding("Pleural Other", side="left", kind="thickening", zone="apical", seed=6),
    ph.Finding("Pleural Other", side="right", kind="plaques", seed=6),
    ph.Finding("Fracture", side="right", rib=6, kind="acute"), ph.Finding("Fracture", side="left", rib=5, kind="healed"),
] + [ph.Finding("Support Devices", kind=k, seed=7) for k in ph.DEVICE_KINDS]


@pytest.mark.parametrize("finding", VISIBLE, ids=lambda f: f"{f.label}-{f.kind or f.side}")
def test_every_finding_is_visible(finding):
    base = ph.draw(ANATOMY, (), 128).astype(np.int16)
    for status in (1, -1):  # hedged findings are fainter but still there
        diff = np.abs(ph.draw(ANATOMY, (replace(finding, status=status),), 128).astype(np.int16) - base)
        assert diff.max() >= 20 and (diff > 8).sum() >= 20, (finding, status, diff.max(), (diff > 8).sum())


def _box(a: ph.Anatomy, u: tuple[float, float], v: tuple[float, float], size: int) -> tuple[slice, slice]:
    """Pixel box of an anatomy-coordinate rectangle (u from the midline, v from the top)."""
    ys = [((x - 0.5) * a.scale + 0.5 + a.cy) * size for x in v]
    xs = [(a.cx + x * a.scale) * size for x in u]
    return slice(int(ys[0]), int(ys[1])), slice(int(min(xs)), int(max(xs)))


def test_effusion_whitens_its_base_only():
    a, size = ANATOMY, 128
    right_base = _box(a, (-0.8 * a.cage_hw, -0.3 * a.cage_hw), (a.dome_right - 0.1, a.dome_right - 0.02), size)
    left_base = _box(a, (0.3 * a.cage_hw, 0.8 * a.cage_hw), (a.dome_left - 0.1, a.dome_left - 0.02), size)
    effusion = ph.Finding("Pleural Effusion", side="right", severity="moderate", zone="lower")
    without, with_ = ph.draw(a, (), size).astype(float), ph.draw(a, (effusion,), size).astype(float)
    assert with_[right_base].mean() > without[right_base].mean() + 25
    assert abs(with_[left_base].mean() - without[left_base].mean()) < 1


def test_pneumothorax_darkens_the_apex_and_cardiomegaly_widens_the_heart():
    a, size = ANATOMY, 128
    apex = _box(a, (0.75 * a.cage_hw, 0.95 * a.cage_hw), (a.apex + 0.08, a.apex + 0.25), size)
    ptx = ph.Finding("Pneumothorax", side="left", severity="large")
    assert ph.draw(a, (ptx,), size)[apex].mean() < ph.draw(a, (), size)[apex].mean() - 3
    assert ph.heart_ctr(a, (ph.Finding("Cardiomegaly", severity="severe"),)) > 0.6 > a.ctr
    heart_band = _box(a, (-0.9 * a.cage_hw, 0.9 * a.cage_hw), (a.heart_v - 0.03, a.heart_v + 0.03), size)
    big = ph.draw(a, (ph.Finding("Cardiomegaly", severity="severe"),), size)[heart_band].mean()
    assert big > ph.draw(a, (), size)[heart_band].mean() + 5


def test_shards_round_trip(tmp_path):
    schema = image_report_schema(ph.LABELS)
    rows = []
    for i in range(7):
        s = ph.generate(1, i, 32)
        rows.append({"id": s.id, "split": "train", "image": ph.encode_png(s.image), "report": s.report, **s.labels,
                     "attributes": json.dumps(s.attributes), "width": 32, "height": 32})
    with ShardWriter(tmp_path, "train", schema, shard_size=3) as w:
        for r in rows:
            w.write(r)
    assert [p.name for p in shard_paths(tmp_path)] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert count_rows(tmp_path, "train") == 7 and not list(tmp_path.glob(".*"))
    back = list(iter_rows(tmp_path, split="train"))
    for r, b in zip(rows, back, strict=True):
        for k, v in r.items():
            assert (math.isnan(v) and math.isnan(b[k])) if isinstance(v, float) and math.isnan(v) else b[k] == v
    assert [r["id"] for r in iter_rows(tmp_path, columns=["id"])] == [r["id"] for r in rows]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "val", schema, shard_size=10) as w:
        w.write(rows[0])
        raise RuntimeError("boom")  # a failed run leaves no val shard and no temporary file
    assert shard_paths(tmp_path, "val") == [] and not list(tmp_path.glob(".*"))


def run_cli(argv: list[str]) -> int:
    """`unix data ...` as unix.cli.main runs it (parser, handler, UserError -> exit 2), data group only."""
    from unix.data import commands

    parser = argparse.ArgumentParser(prog="unix")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError:
        return 2


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["data", "phantom", "--out", str(out), "--n", "20", "--seed", "5", "--size", "64", "--png",
            "--splits", "0.5,0.25,0.25", "--shard-size", "4"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "train 10, val 5, test 5" in printed and "Pleural Effusion" in printed
    assert count_rows(out) == 20 and len(shard_paths(out, "train")) == 3
    rows = list(iter_rows(out))
    # val/test images come from their own random streams (never a training image): ids say the split
    assert [r["id"] for r in rows] == ([f"phantom-5-{i:07d}" for i in range(10)] + [f"phantom-5-val-{i:07d}" for i in range(10, 15)]
                                       + [f"phantom-5-test-{i:07d}" for i in range(15, 20)])
    first = ph.generate(5, 0, 64)
    assert rows[0]["image"] == ph.encode_png(first.image) and rows[0]["report"] == first.report
    assert {r["split"] for r in rows} == {"train", "val", "test"} and rows[0]["width"] == 64
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 20 and all((out / m["file"]).is_file() for m in meta)
    assert json.loads((out / "info.json").read_text())["counts"] == {"train": 10, "val": 5, "test": 5}
    assert run_cli(argv) == 2  # not empty, no --overwrite
    assert run_cli(argv[:-2] + ["--shard-size", "100", "--overwrite"]) == 0
    assert [p.name for p in shard_paths(out)] == ["train-00000.parquet", "val-00000.parquet", "test-00000.parquet"]
    assert run_cli(["data", "phantom", "--out", str(tmp_path / "x"), "--n", "2", "--size", "100"]) == 2
    assert run_cli(["data", "phantom", "--out", str(tmp_path / "x"), "--n", "2", "--splits", "0.5,0.6,0"]) == 2


def test_phantom_classifier_shapes_and_weights_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from unix.eval.phantom_classifier import (ClassifierConfig, PhantomClassifier, auroc, load_extractor,
                                              save_classifier)

    torch.manual_seed(0)
    model = PhantomClassifier(ClassifierConfig(input_size=64, channels=(8, 16, 24)))
    gray = torch.from_numpy(np.stack([ph.generate(0, i, 64).image for i in range(3)]))[:, None]  # (3, 1, 64, 64) uint8
    assert model(gray).shape == (3, 14) and model.features(gray).shape == (3, 24)
    save_classifier(model, tmp_path / "phantom-classifier", {"note": "test"})
    save_classifier(model, tmp_path / "phantom-classifier")  # replacing an existing folder works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom-classifier"]
    extractor = load_extractor(tmp_path, "cpu")
    rgb = gray.expand(-1, 3, -1, -1)  # the evaluation loader gives RGB copies, at any size
    model.eval()
    with torch.no_grad():
        assert torch.allclose(extractor(rgb), model.features(gray), atol=1e-5)
        assert extractor(torch.nn.functional.interpolate(rgb.float() / 255, size=96)).shape == (3, 24)
    assert extractor.predict(rgb).shape == (3, 14) and extractor.input_size == 64
    with pytest.raises(UserError, match="not a phantom classifier folder"):
        load_extractor(tmp_path / "missing", "cpu")
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5 and auroc(np.ones(3), np.ones(3)) is None
