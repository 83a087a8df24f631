"""Image metrics (FD, KID, PRDC, shards, conditional, finding agreement), RAD-DINO features, `unix eval images`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from unix.errors import UserError
from unix.eval import image_commands
from unix.eval import image_metrics as im
from unix.eval.features import (
    RAD_DINO_MEAN, RAD_DINO_STD, DinoPreprocess, RadDinoExtractor, extract_features, get_extractor, register_extractor,
)

# --- metrics ------------------------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert abs(im.frechet_distance(x, x)) < 1e-8
    y = np.random.default_rng(1).normal(size=(20, 64))  # N < D: singular covariance
    assert abs(im.frechet_distance(y, y)) < 1e-8


def test_fd_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d, n = 8, 200_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)  # diagonal variances
    x = mu1 + np.sqrt(s1) * rng.normal(size=(n, d))
    y = mu2 + np.sqrt(s2) * rng.normal(size=(n, d))
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert im.frechet_distance(x, y) == pytest.approx(expected, rel=0.02, abs=0.02)
    # with exact moments the formula is exact: build samples whose mean/cov are exactly those
    z = rng.normal(size=(1000, d))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # mean 0, cov I
    assert im.frechet_distance(mu1 + np.sqrt(s1) * z, mu2 + np.sqrt(s2) * z) == pytest.approx(expected, rel=1e-9)


def test_kid_is_unbiased_on_equal_distributions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 16)), rng.normal(size=(4000, 16))
    mean, std = im.kid(x, y, n_subsets=200, subset_size=50, seed=0)
    assert abs(mean) < 3 * std / np.sqrt(200)
    values = [im._mmd2_unbiased(x[i : i + 20], y[i : i + 20]) for i in range(0, 400, 20)]
    assert min(values) < 0 < max(values)  # unbiased: can be negative
    far, _ = im.kid(x, y + 1.0, n_subsets=10, subset_size=100, seed=0)
    assert far > 10 * std
    assert im.kid(x, y, n_subsets=5, subset_size=100, seed=3) == im.kid(x, y, n_subsets=5, subset_size=100, seed=3)  # seeded


def test_prdc_on_a_hand_computed_case():
    # 1-D, k = 1. Real {0, 1, 3}: radii 1, 1, 2. Fake {0.5, 10, 11}: radii 9.5, 1, 1.
    # 0.5 lies in the balls of 0 and 1, 10 and 11 in none: precision 1/3, density (2 + 0 + 0) / 3 = 2/3.
    # every real point is within 9.5 of 0.5: recall 1; nearest fake of 0, 1 (0.5) inside their radius 1,
    # of 3 (2.5) outside radius 2: coverage 2/3.
    real, fake = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0], [11.0]])
    expected = {"precision": 1 / 3, "recall": 1.0, "density": 2 / 3, "coverage": 2 / 3}
    assert im.prdc(real, fake, nearest_k=1) == pytest.approx(expected)
    assert im._prdc_numpy(real, fake, 1) == pytest.approx(expected)


def test_prdc_numpy_matches_the_prdc_package():
    pytest.importorskip("prdc")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    assert im._prdc_numpy(x, y, 5) == pytest.approx(im.prdc(x, y, 5), abs=1e-12)


def test_sharded_is_the_mean_of_the_quarters():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.normal(0.5, 1, size=(44, 4))
    quarters = [im.frechet_distance(x[i * 10 : (i + 1) * 10], y[i * 11 : (i + 1) * 11]) for i in range(4)]
    assert im.sharded(im.frechet_distance, x, y) == pytest.approx(np.mean(quarters))
    out = im.sharded(lambda r, f: {"fd": im.frechet_distance(r, f), "n": len(r)}, x, y)
    assert out == pytest.approx({"fd": np.mean(quarters), "n": 10})
    assert im.sharded(im.frechet_distance, x, y, n_shards=1) == pytest.approx(im.frechet_distance(x, y))


def test_conditional_metrics_restrict_and_skip():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    real_labels, fake_labels = np.zeros((30, 14)), np.full((30, 14), np.nan)
    real_labels[:12, 2] = 1  # Cardiomegaly: 12 real
    fake_labels[5:20, 2] = 1  # 15 fake
    real_labels[:3, 5] = 1  # Edema: too few
    out = im.conditional_metrics(lambda r, f: {"n": (len(r), len(f))}, x, y, real_labels, fake_labels, min_images=10)
    assert out["Cardiomegaly"] == {"n_real": 12, "n_fake": 15, "metrics": {"n": (12, 15)}}
    assert "skipped" in out["Edema"] and "metrics" not in out["Edema"]
    assert set(out) == set(im.CHEXPERT_FINDINGS)


def test_finding_agreement_on_a_hand_computed_table():
    names = im.CHEXPERT_FINDINGS
    prompt, pred = np.zeros((4, 14)), np.zeros((4, 14))
    c, e, p = names.index("Cardiomegaly"), names.index("Edema"), names.index("Pneumothorax")
    prompt[:, c] = [1, 1, 1, 0]
    pred[:, c] = [1, 1, 0, 1]  # TP 2, FP 1, FN 1 -> F1 2/3
    prompt[:, e] = [1, -1, 0, 0]
    pred[:, e] = [0, 1, 0, np.nan]  # uncertain prompt counts as negative: TP 0, FP 1, FN 1 -> F1 0
    pred[:, p] = [0, 0, 0, 1]  # TP 0, FP 1 -> F1 0
    out = im.finding_agreement(pred, prompt)
    assert out["per_finding"]["Cardiomegaly"] == {"f1": pytest.approx(2 / 3), "tp": 2, "fp": 1, "fn": 1}
    assert out["per_finding"]["Edema"]["f1"] == 0.0
    assert out["per_finding"]["Pneumothorax"]["f1"] == 0.0
    assert out["per_finding"]["Fracture"]["f1"] is None  # positive nowhere: no F1
    assert out["micro_f1"] == pytest.approx(2 / (2 + (3 + 2) / 2))
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert out["n"] == 4
    # uncertain as positive: Edema row 1 becomes a true positive
    assert im.finding_agreement(pred, prompt, uncertain="positive")["per_finding"]["Edema"]["tp"] == 1


# --- RAD-DINO features ---------------------------------------------------------------------------------

RAD_DINO_PREPROCESSOR = {  # the layout of microsoft/rad-dino's preprocessor_config.json
    "crop_size": {"height": 56, "width": 56},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.2583, 0.2583, 0.2583],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 56},
}


@pytest.fixture(scope="module")
def rad_dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("weights") / "rad-dino"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56)
    Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PREPROCESSOR))
    return folder


def test_rad_dino_extractor_gives_cls_features(rad_dino_dir):
    extractor = RadDinoExtractor(rad_dino_dir, device="cpu")
    assert extractor.preprocess.shortest_edge == 56 and extractor.preprocess.mean == (0.5307,) * 3
    images = torch.randint(0, 256, (3, 1, 70, 90), dtype=torch.uint8)
    feats = extractor(images)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    with torch.no_grad():
        out = extractor.model(pixel_values=extractor.preprocess(images))
    torch.testing.assert_close(feats, out.pooler_output)  # CLS after the final LayerNorm
    batched = extract_features(extractor, iter(images.expand(-1, 3, -1, -1)), batch_size=2, total=3)
    np.testing.assert_allclose(batched, feats.numpy(), atol=1e-5)


def test_dino_preprocess_matches_the_hugging_face_processor():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    config = dict(RAD_DINO_PREPROCESSOR, size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518})
    config.pop("image_processor_type")
    hf = BitImageProcessorPil(**config)
    rng = np.random.default_rng(0)
    for shape in ((299, 299, 3), (299, 320, 3), (340, 300, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = np.asarray(hf(image, return_tensors="np")["pixel_values"])[0]
        ours = DinoPreprocess()(torch.from_numpy(image).permute(2, 0, 1)[None])[0].numpy()  # defaults: RAD-DINO's own
        assert ours.shape == expected.shape == (3, 518, 518)
        np.testing.assert_array_equal(ours, expected)  # uint8 images go through the processor's own PIL path
    grey = rng.integers(0, 256, (1, 1, 299, 299), dtype=np.uint8)
    expected = np.asarray(hf(np.repeat(grey[0].transpose(1, 2, 0), 3, axis=-1), return_tensors="np")["pixel_values"])[0]
    np.testing.assert_array_equal(DinoPreprocess()(torch.from_numpy(grey))[0].numpy(), expected)
    # float images (REPA targets) take the torch resize with the same kernel, unrounded and unclipped:
    # on a smooth image (no bicubic overshoot past 0 or 255) within a grey level of the processor
    smooth = (np.add.outer(np.arange(299), np.arange(299)) * 255 / 596).astype(np.uint8)[None, None]
    expected = np.asarray(hf(np.repeat(smooth[0].transpose(1, 2, 0), 3, axis=-1), return_tensors="np")["pixel_values"])[0]
    floats = DinoPreprocess()(torch.from_numpy(smooth).float() / 255)[0].numpy()
    assert np.abs(floats - expected).max() * 0.2583 * 255 < 1.0


def test_rad_dino_without_preprocessor_config_uses_its_own_normalisation(rad_dino_dir, tmp_path, caplog):
    folder = tmp_path / "rad-dino"
    shutil.copytree(rad_dino_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="unix.eval.features"):
        extractor = RadDinoExtractor(folder, device="cpu")
    p = extractor.preprocess
    assert p.mean == (0.5307,) * 3 and p.std == (0.2583,) * 3  # microsoft/rad-dino's processor, not ImageNet's
    assert (p.shortest_edge, p.crop_height, p.crop_width, p.resample) == (518, 518, 518, 3)  # bicubic
    assert "no preprocessor_config.json" in caplog.text and "0.5307" in caplog.text
    assert RAD_DINO_MEAN == (0.5307,) * 3 and RAD_DINO_STD == (0.2583,) * 3


def test_missing_rad_dino_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="weights/rad-dino"):
        get_extractor("raddino", tmp_path, "cpu")
    with pytest.raises(UserError, match="unknown feature extractor"):
        get_extractor("inception", tmp_path, "cpu")
    try:
        import unix.eval.phantom_classifier  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(UserError, match="phantom"):
            get_extractor("phantom", tmp_path, "cpu")


# --- unix eval images ---------------------------------------------------------------------------------


def _write_pngs(folder, n, seed, size=(40, 48)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(folder / f"img{i:02d}.png")


def _parse(argv):
    parser = argparse.ArgumentParser()
    image_commands.register(parser.add_subparsers())
    return parser.parse_args(["images", *argv])


def test_eval_images_end_to_end(tmp_path, rad_dino_dir, capsys):
    _write_pngs(tmp_path / "real", 14, seed=0)
    _write_pngs(tmp_path / "fake", 14, seed=1)
    (tmp_path / "fake" / "broken.png").write_bytes(b"not a png")
    labels = ["id," + ",".join(im.CHEXPERT_FINDINGS)]
    labels += [f"img{i:02d}," + ",".join(["1" if (j == 2 and i < 7) else "0" for j in range(14)]) for i in range(14)]
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    out = tmp_path / "results" / "images.json"
    args = _parse([
        "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--weights-dir", str(rad_dino_dir.parent),
        "--labels", str(tmp_path / "labels.csv"), "--out", str(out), "--batch-size", "5", "--device", "cpu",
        "--shards", "2", "--kid-subsets", "10", "--min-images", "5",
    ])
    assert args.handler(args) == 0
    result = json.loads(out.read_text())
    assert result["n_real"] == 14 and result["n_fake"] == 14 and result["features"] == "raddino"
    assert [s["path"].endswith("broken.png") for s in result["skipped"]["fake"]] == [True]
    assert len(result["shards"]) == 2
    # default protocol "release": 3-decimal shard values, their mean rounded again; no kid_std
    assert result["protocol"]["name"] == "release" and result["protocol"]["decimals"] == 3
    assert result["protocol"]["deviations"] == ["dedup path (authors: prompt)", "n_shards 2 (authors: 4)", "kid_subsets 10 (authors: 100)"]
    assert result["metrics"]["fd"] == round(sum(s["fd"] for s in result["shards"]) / 2, 3)
    assert all(s["fd"] == round(s["fd"], 3) for s in result["shards"])
    assert set(result["metrics"]) == {"fd", "kid", "precision", "recall", "density", "coverage"}
    assert "metrics" in result["conditional"]["Cardiomegaly"] and "skipped" in result["conditional"]["Edema"]
    printed = capsys.readouterr().out
    assert "| FD |" in printed and "| Cardiomegaly | 7 | 7 |" in printed and "Protocol release:" in printed
    assert not list(out.parent.glob(".*.tmp"))
    with pytest.raises(UserError, match="--overwrite"):
        args.handler(args)  # never replaces a result without --overwrite

    args = _parse([
        "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--weights-dir", str(rad_dino_dir.parent),
        "--out", str(out), "--overwrite", "--device", "cpu", "--shards", "2", "--kid-subsets", "10", "--protocol", "exact",
    ])
    assert args.handler(args) == 0
    exact = json.loads(out.read_text())
    assert exact["protocol"]["name"] == "exact" and exact["protocol"]["decimals"] is None and "deviations" not in exact["protocol"]
    assert exact["metrics"]["fd"] == pytest.approx(np.mean([s["fd"] for s in exact["shards"]]))
    assert set(exact["metrics"]) == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage"}
    assert exact["metrics"]["fd"] == pytest.approx(result["metrics"]["fd"], abs=1e-3)  # release: exact, rounded twice


def test_eval_images_with_a_plugged_extractor_and_manifest(tmp_path, capsys):
    class MeanColour:
        name, input_size, device = "mean-colour", 16, torch.device("cpu")

        def __call__(self, images):
            x = images.float() / 255
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, :8].mean((1, 2, 3))], dim=1)

    register_extractor("mean-colour", lambda weights_dir, device: MeanColour())
    _write_pngs(tmp_path / "imgs", 8, seed=0)
    manifest = tmp_path / "fake.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"imgs/img{i:02d}.png", "id": f"s{i}"}) + "\n" for i in range(8)))
    args = _parse(["--real", str(tmp_path / "imgs"), "--fake", str(manifest), "--features", "mean-colour", "--shards", "1", "--kid-subsets", "5"])
    assert args.handler(args) == 0
    assert "| FD | 0.000 |" in capsys.readouterr().out  # the same images on both sides

    args = _parse(["--real", str(tmp_path / "imgs"), "--fake", str(manifest), "--features", "mean-colour"])
    with pytest.raises(UserError, match="--shards"):
        args.handler(args)  # 8 images cannot make 4 shards of 7
    with pytest.raises(UserError, match="no such folder"):
        image_commands.list_images(tmp_path / "missing")


def test_agreement_command_on_real_phantom_images(tmp_path, capsys):
    """The shipped classifier on real phantom images against their own labels: near the ceiling."""
    from pathlib import Path

    from unix.cli import main

    weights = Path(__file__).resolve().parents[1] / "weights"
    if not (weights / "phantom-classifier" / "model.safetensors").is_file():
        pytest.skip("phantom classifier not present")
    assert main(["data", "phantom", "--out", str(tmp_path / "ph"), "--n", "40", "--seed", "11", "--png"]) == 0
    out = tmp_path / "agree.json"
    (tmp_path / "ph" / "png" / "train" / "junk.png").write_bytes(b"x")  # no labels: reported and skipped
    assert main(["eval", "agreement", "--images", str(tmp_path / "ph" / "png"), "--labels",
                 str(tmp_path / "ph" / "metadata.jsonl"), "--weights-dir", str(weights), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 40 and len(result["skipped"]) == 1
    assert result["micro_f1"] > 0.8
    assert "micro F1" in capsys.readouterr().out


def test_repa_raddino_patches_follow_the_model(rad_dino_dir):
    from unix.train.repa import build_encoder, target_tokens

    encoder = build_encoder("raddino", str(rad_dino_dir.parent))
    images = torch.rand(2, 1, 56, 56)
    fmap = encoder(images)
    assert fmap.shape == (2, 32, 4, 4) and encoder.dim == 32
    with torch.no_grad():
        hidden = encoder.net(pixel_values=encoder.preprocess(images)).last_hidden_state
    torch.testing.assert_close(fmap[1, :, 0, 1], hidden[1, 1 + 1])  # after CLS: row 0, column 1
    tokens = target_tokens(encoder, images, 2, 2)  # area-averaged to a 2x2 latent grid, raster order
    assert tokens.shape == (8, 32)
    torch.testing.assert_close(tokens[5], fmap[1, :, :2, 2:].mean(dim=(1, 2)))


def test_agreement_labels_can_be_the_authors_prompt_csv(tmp_path):
    from unix.eval.chexpert import CHEXPERT_FINDINGS
    from unix.eval.image_commands import read_labels

    path = tmp_path / "generations_with_metadata.csv"
    path.write_text('id,annotated_prompt,chexpert_labels,synthetic_filename\n'
                    '0,Small effusion.,"{\'Pleural Effusion\': 1.0, \'Edema\': nan}",SyntheticImg_0.png\n'
                    '1,Clear.,"{\'No Finding\': 1.0}",SyntheticImg_1.png\n')
    labels = read_labels(path)
    assert sorted(labels) == ["SyntheticImg_0", "SyntheticImg_1"]  # the generated images' names
    effusion, edema = CHEXPERT_FINDINGS.index("Pleural Effusion"), CHEXPERT_FINDINGS.index("Edema")
    assert labels["SyntheticImg_0"][effusion] == 1.0 and np.isnan(labels["SyntheticImg_0"][edema])
    assert labels["SyntheticImg_1"][CHEXPERT_FINDINGS.index("No Finding")] == 1.0
