"""`unix eval images --protocol release` against the UniX authors' CheXGenBench pipeline, run outside the
project on the same constructed images (`image_protocol_oracle.py` builds them and holds the oracle).

Fixtures: `/tmp/oracle-h2/bin/python tests/image_protocol_oracle.py` with torch 2.13.0+cpu,
torchmetrics 1.9.0 (its FID/KID code is unchanged since 1.2), prdc 0.2, pandas 3.1.1, Pillow 13.0.0 and 12.3.0,
numpy 2.4.6.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import PIL
import pytest
import torch

from image_protocol_oracle import build_case, exact_features, project, projection
from unix.cli import main
from unix.errors import UserError
from unix.eval import image_metrics as im
from unix.eval.features import load_image, register_extractor
from unix.eval.image_commands import ImageItem, deduplicate, evaluate_image_sets, list_images

# Pillow's resize changed between releases, so the authors' pixels, and every number after them,
# depend on the Pillow installed (theirs is unpinned; their gradio==3.47.1 implies Pillow < 11).
# The oracle was run with each Pillow below; other versions are skipped, saying so.
PILLOW = int(PIL.__version__.split(".")[0])
_SHARDS_28_28 = {  # 32 real rows (4 repeated prompts -> 28) against 28 generated images: shards of 7 and 7, KID deterministic
    13: [(0.92, 3.095, 0.857, 0.629), (0.631, 1.8, 0.857, 0.657), (0.464, 0.892, 1.0, 0.886), (0.866, 2.731, 0.857, 0.629)],
    12: [(0.92, 3.095, 0.857, 0.629), (0.631, 1.8, 0.857, 0.657), (0.464, 0.892, 1.0, 0.886), (0.867, 2.732, 0.857, 0.629)],
}
_MEAN_28_28 = {13: (0.72, 2.13, 0.893, 0.7), 12: (0.72, 2.13, 0.893, 0.7)}
# the same 28 real against 30 generated: shards 7/8, 7/8, 7/7, 7/7. The oracle calls torch.manual_seed(42)
# just before KID's compute() in the 7/8 shards, where the subsets drawn change the value.
_SHARDS_28_30 = {
    13: [(0.786, 2.511, 0.875, 0.725), (0.891, 3.049, 0.75, 0.475), (0.351, 0.635, 1.0, 0.886), (0.599, 1.574, 0.857, 0.743)],
    12: [(0.786, 2.511, 0.875, 0.725), (0.891, 3.049, 0.75, 0.475), (0.351, 0.636, 1.0, 0.886), (0.599, 1.574, 0.857, 0.743)],
}
_MEAN_28_30 = {13: (0.657, 1.942, 0.87, 0.707), 12: (0.657, 1.943, 0.87, 0.707)}
# sha256 of the authors' (3, 299, 299) uint8 tensors of every constructed image, real then generated, in path order
_PIXELS_SHA256 = {13: "08f1ee8d5af8d7ababa4b04e3b32566d212c6cf1f1080749afdf7bd054b2cb01",
                  12: "3cd8c0bac816d06953d5d7dc96aef6489a1edb8712fe2d5eef8a631a8af9a6c6"}
if PILLOW not in _PIXELS_SHA256:
    pytest.skip(f"no oracle fixtures for Pillow {PIL.__version__} (have {sorted(_PIXELS_SHA256)}): rerun "
                "tests/image_protocol_oracle.py with it", allow_module_level=True)


def _metrics(fd, kid, precision, density):  # recall and coverage are 1.0 in every shard of this case
    return {"fd": fd, "kid": kid, "precision": precision, "recall": 1.0, "density": density, "coverage": 1.0}


AUTHORS_PIXELS_SHA256 = _PIXELS_SHA256[PILLOW]
RELEASE_28_28 = {"shards": [_metrics(*s) for s in _SHARDS_28_28[PILLOW]], "metrics": _metrics(*_MEAN_28_28[PILLOW])}
RELEASE_28_30 = {"shards": [_metrics(*s) for s in _SHARDS_28_30[PILLOW]], "metrics": _metrics(*_MEAN_28_30[PILLOW])}
# torchmetrics at full precision on float64 features (`exact_features`): KID with subset_size = N (deterministic)
TORCHMETRICS_FULL_RANK = {"fd": 2.426987567628265, "kid": 0.24621758771403868}
TORCHMETRICS_SINGULAR = {"fd": 16.169074269154144, "kid": 0.4741477948206921}  # 10 samples in 16 dimensions


class OracleProjection:
    """The oracle's feature module as a `unix` extractor."""

    name, input_size, device = "oracle-projection", 299, torch.device("cpu")

    def __init__(self):
        self.weights = projection()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return project(self.weights, images)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    register_extractor(OracleProjection.name, lambda weights_dir, device: OracleProjection())
    return build_case(tmp_path_factory.mktemp("release"))


def test_release_pixels_are_the_authors_bytes(case):
    files = [p for root in (case["real_root"], case["fake_root"]) for p in sorted(root.rglob("*")) if p.is_file()]
    assert len(files) == 60
    ours = [load_image(p, 299, released_round_trip=True) for p in files]
    assert all(x.shape == (3, 299, 299) and x.dtype == torch.uint8 for x in ours)
    assert hashlib.sha256(b"".join(x.numpy().tobytes() for x in ours)).hexdigest() == AUTHORS_PIXELS_SHA256
    # ToTensor then (x * 255).to(uint8) truncates, but returns every one of the 256 levels unchanged
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal((levels.to(torch.float32).div(255) * 255).to(torch.uint8), levels)
    assert all(torch.equal(x, load_image(p, 299)) for x, p in zip(ours[:8], files[:8]))


def test_release_protocol_reproduces_the_authors_numbers(case, tmp_path, capsys):
    out = tmp_path / "images.json"
    argv = ["eval", "images", "--real", str(case["real_csv"]), "--real-root", str(case["real_root"]),
            "--fake", str(case["fake_28"]), "--fake-root", str(case["fake_root"]), "--features", OracleProjection.name,
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0  # --protocol release is the default
    result = json.loads(out.read_text())
    assert (result["n_real_listed"], result["duplicates_dropped"], result["n_real"], result["n_fake"]) == (32, 4, 28, 28)
    assert result["protocol"]["name"] == "release" and result["protocol"]["dedup"] == "prompt"
    assert "deviations" not in result["protocol"]
    assert result["shards"] == RELEASE_28_28["shards"]
    assert result["metrics"] == RELEASE_28_28["metrics"]
    printed = capsys.readouterr().out
    assert "| FD | 0.720 |" in printed and "| KID | 2.130 |" in printed and "repeats an earlier row's: 4" in printed


def test_library_entry_point_with_unequal_sets(case):
    real = list_images(case["real_csv"], case["real_root"])
    fake = list_images(case["fake_30"], case["fake_root"], generated=True)
    result = evaluate_image_sets(real, fake, OracleProjection(), protocol="release", batch_size=5)
    assert (result["n_real"], result["n_fake"]) == (28, 30)
    assert result["shards"] == RELEASE_28_30["shards"]
    assert result["metrics"] == RELEASE_28_30["metrics"]
    assert result["skipped"] == {"real": [], "fake": []}
    assert result["protocol"]["decimals"] == 3 and "torch.Generator seeded 42" in result["protocol"]["kid_sampling"]

    exact = evaluate_image_sets(real, fake, OracleProjection(), protocol="exact")
    assert exact["protocol"]["name"] == "exact" and set(exact["metrics"]) == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage"}
    assert exact["metrics"]["fd"] != round(exact["metrics"]["fd"], 3)  # full precision
    # `exact` reads pixels with the project's reader (colour files become their luma), so it is close to,
    # not equal to, the release numbers on this set of gray and colour files
    assert exact["metrics"]["fd"] == pytest.approx(RELEASE_28_30["metrics"]["fd"], abs=0.01)


def test_authors_csvs_are_read_as_they_are(case):
    real = list_images(case["real_csv"], case["real_root"])
    assert len(real) == 32 and real[0].id == "100" and real[0].path == case["real_root"] / real[0].path.relative_to(case["real_root"])
    assert real[5].prompt == real[1].prompt and real[30].path == real[7].path and real[30].prompt != real[7].prompt
    assert set(real[0].labels) == {"Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"}
    assert None in {v for item in real for v in item.labels.values()}  # nan cells
    fake = list_images(case["fake_28"], case["fake_root"], generated=True)
    assert len(fake) == 28 and fake[0].path == case["fake_root"] / "SyntheticImg_200.png"  # not its `path` column
    assert [f.prompt for f in fake] == [r.prompt for r in deduplicate(real)[0]]
    with pytest.raises(UserError, match="no such folder"):
        list_images(case["real_csv"], case["real_root"] / "missing")
    with pytest.raises(UserError, match="none of its 32 images exists"):
        list_images(case["real_csv"])  # the paths are under the MIMIC root, not beside the CSV
    with pytest.raises(UserError, match="CSV/JSONL lists"):
        list_images(case["fake_root"], case["fake_root"])


def test_deduplication_is_by_prompt_first_kept(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    items = [ImageItem("1", a, "x"), ImageItem("2", b, "y"), ImageItem("3", c, "x"), ImageItem("4", a, "z"),
             ImageItem("5", b, ""), ImageItem("6", c, "")]
    kept, key = deduplicate(items)
    assert key == "prompt" and [i.id for i in kept] == ["1", "2", "4", "5"]  # empty prompts count as one, as pandas' NaN
    kept, key = deduplicate([ImageItem("1", a), ImageItem("2", b), ImageItem("3", tmp_path / "." / "a.png")])
    assert key == "path" and [i.id for i in kept] == ["1", "2"]


def test_full_precision_metrics_match_torchmetrics():
    x, y, xs, ys = exact_features()
    assert im.frechet_distance(x, y) == pytest.approx(TORCHMETRICS_FULL_RANK["fd"], rel=1e-10)
    assert im.frechet_distance_torchmetrics(x, y) == pytest.approx(TORCHMETRICS_FULL_RANK["fd"], rel=1e-12)
    mean, std = im.kid(x, y, n_subsets=10)
    assert mean == pytest.approx(TORCHMETRICS_FULL_RANK["kid"], rel=1e-12) and std < 1e-12
    assert im.kid_torchmetrics(x, y, n_subsets=10)[0] == pytest.approx(TORCHMETRICS_FULL_RANK["kid"], rel=1e-12)
    # N < D: torchmetrics sums square roots of rounding noise in the zero eigenvalues; we drop them
    assert im.frechet_distance_torchmetrics(xs, ys) == pytest.approx(TORCHMETRICS_SINGULAR["fd"], rel=1e-12)
    assert im.frechet_distance(xs, ys) == pytest.approx(TORCHMETRICS_SINGULAR["fd"], abs=1e-5)
    assert im.kid(xs, ys, n_subsets=10)[0] == pytest.approx(TORCHMETRICS_SINGULAR["kid"], rel=1e-12)


def test_release_rounding_is_per_shard_then_of_the_mean():
    # fid.py rounds Python floats (correctly rounded); combine_shards.py rounds numpy float64 (scale, round half
    # to even, unscale): the mean 0.8705 of these shards is 0.87 there, 0.871 with Python's round
    shards = [{"precision": 0.875}, {"precision": 0.75}, {"precision": 1.0}, {"precision": 0.857}]
    assert round(sum(s["precision"] for s in shards) / 4, 3) == 0.871
    assert im.combine(shards, "release") == {"precision": 0.87}
    assert type(im.combine(shards, "release")["precision"]) is float  # JSON-ready
    assert im.combine(shards, "exact") == pytest.approx({"precision": 0.8705})
    x = np.random.default_rng(0).normal(size=(8, 3))
    release = im.image_metrics(x, x + 0.3, kid_subsets=5, protocol="release")
    exact = im.image_metrics(x.astype(np.float32), (x + 0.3).astype(np.float32), kid_subsets=5)
    assert release["fd"] == round(exact["fd"], 3) and release["precision"] == round(exact["precision"], 3)
    with pytest.raises(ValueError, match="protocol"):
        im.image_metrics(x, x, protocol="paper")
