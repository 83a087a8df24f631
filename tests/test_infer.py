"""Inference on a tiny random model: cached decoding, batching, guidance, CLI, bad inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import unix.flow as flow
from unix.cli import main
from unix.config import load_model_config
from unix.infer import ImageSettings, ReportSettings, load_pipeline
from unix.infer.images import sample_latents, sample_latents_naive
from unix.infer.reports import generate_report_ids, generate_report_ids_uncached
from unix.models.unix import UniX
from unix.tokenizer import train_tokenizer
from unix.weights.folder import save_model

CORPUS = ["FINDINGS: The heart is enlarged. Small left pleural effusion. IMPRESSION: Cardiomegaly."] * 10 + [
    "No pneumothorax. Lungs are clear."
] * 10


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = UniX(cfg).eval()
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.2)  # a non-zero velocity head
    tok = train_tokenizer(CORPUS, 300, cfg.tokens)
    return model, tok


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    from unix.models.vae import LatentCodec, build_vae
    from unix.weights.ldm_vae import save_vae_safetensors

    model, tok = tiny
    root = tmp_path_factory.mktemp("w")
    path = save_model(model, root / "tiny")
    tok.save(path)
    torch.manual_seed(1)
    (path / "vae").mkdir()
    save_vae_safetensors(LatentCodec(build_vae(model.cfg.vae), model.cfg.vae), path / "vae" / "model.safetensors")
    return path


def pixels(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_cached_decoding_equals_full_recomputation(tiny):
    model, tok = tiny
    s = ReportSettings(max_new_tokens=10)
    assert generate_report_ids(model, tok, pixels(2), s) == generate_report_ids_uncached(model, tok, pixels(2), s)


def test_batched_reports_equal_one_by_one(tiny):
    model, tok = tiny
    s = ReportSettings(max_new_tokens=10)
    px = pixels(3, seed=4)
    batched = generate_report_ids(model, tok, px, s)
    assert batched == [generate_report_ids(model, tok, px[i : i + 1], s)[0] for i in range(3)]


def test_reports_stop_at_eos(tiny):
    model, tok = tiny
    eos = model.cfg.tokens.eos
    with torch.no_grad():
        bias = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] = 50 * model.lm_head.weight[eos].sign()  # make EOS very likely
        out = generate_report_ids(model, tok, pixels(2), ReportSettings(max_new_tokens=20))
        model.lm_head.weight[eos] = bias
    assert all(len(r) < 20 and eos not in r for r in out)


SMALL = ImageSettings(size=64, steps=6)
PROMPTS = ["Small left pleural effusion.", "The heart is enlarged and there is no pneumothorax."]


@pytest.mark.parametrize("latent_rope", ["shared", "2d"])
def test_sampler_equals_naive_reference(tiny, latent_rope):
    from unix.config import override_config

    model, tok = tiny
    if latent_rope != model.cfg.gen.latent_rope:
        other = UniX(override_config(model.cfg, [f"gen.latent_rope={latent_rope}"])).eval()
        other.load_state_dict(model.state_dict())
        model = other
    fast = sample_latents(model, tok, PROMPTS, [1, 2], SMALL)
    slow = sample_latents_naive(model, tok, PROMPTS, [1, 2], SMALL)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_sampler_with_latent_patch_two(tiny):
    from unix.config import override_config

    model, tok = tiny
    cfg = override_config(model.cfg, ["gen.latent_patch_size=2"])
    torch.manual_seed(0)
    p2 = UniX(cfg).eval()
    assert p2.vae2llm.in_features == p2.llm2vae.out_features == 4 * cfg.vae.latent_channels
    with torch.no_grad():
        p2.llm2vae.weight.normal_(0, 0.2)
    fast = sample_latents(p2, tok, PROMPTS, [1, 2], SMALL)
    assert fast.shape == (2, cfg.vae.latent_channels, 4, 4)  # 64 px: a 4x4 VAE grid, 2x2 tokens
    torch.testing.assert_close(fast, sample_latents_naive(p2, tok, PROMPTS, [1, 2], SMALL), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of 32"):
        sample_latents(p2, tok, PROMPTS, [1], ImageSettings(size=48, steps=3))


def test_batched_images_equal_one_by_one(tiny):
    model, tok = tiny
    both = sample_latents(model, tok, PROMPTS, [5, 6], SMALL)
    second = sample_latents(model, tok, PROMPTS[1:], [6], SMALL)
    torch.testing.assert_close(both[1], second[0], atol=1e-5, rtol=1e-5)


def test_guidance_one_equals_no_guidance(tiny, monkeypatch):
    model, tok = tiny
    s1 = ImageSettings(size=64, steps=6, guidance=1.0)
    a = sample_latents(model, tok, PROMPTS[:1], [3], s1)
    s_none = ImageSettings(size=64, steps=6, guidance=2.0, interval=(2.0, 3.0))  # interval never active
    b = sample_latents(model, tok, PROMPTS[:1], [3], s_none)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = sample_latents(model, tok, PROMPTS[:1], [3], ImageSettings(size=64, steps=6, guidance=2.0))
    assert (a - c).abs().max() > 1e-4  # and guidance does change the result


def test_schedule_and_interval_boundaries():
    s = flow.schedule(50, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 50
    assert abs(float(s[-2]) - 0.0588) < 1e-3  # last Euler move starts at t' = 0.0588 (reference)
    active = [flow.guidance_active(float(t), (0.4, 1.0)) for t in s[:-1]]
    assert sum(active) == 41 and all(active[:41]) and not any(active[41:])
    assert flow.guidance_active(1.0, (0.4, 1.0)) and not flow.guidance_active(0.4, (0.4, 1.0))


def test_guided_velocity_rescales_per_sample():
    vc = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])
    vu = torch.zeros_like(vc)
    v = flow.guided_velocity(vc, vu, 2.0)  # 2 vc, renormed back to |vc| per sample
    torch.testing.assert_close(v, vc)


def test_unconditional_branch_sees_no_prompt(tiny, monkeypatch):
    """The unconditional velocity of the first step (same noise) must not depend on the prompt,
    and must equal the image block run alone at position 0."""
    import unix.infer.images as images

    model, tok = tiny
    seen = []
    monkeypatch.setattr(images, "guided_velocity", lambda vc, vu, w: seen.append(vu) or flow.guided_velocity(vc, vu, w))
    s = ImageSettings(size=64, steps=3, guidance=2.0)
    sample_latents(model, tok, PROMPTS[:1], [7], s)
    sample_latents(model, tok, PROMPTS[1:], [7], s)
    torch.testing.assert_close(seen[0], seen[2], atol=1e-6, rtol=1e-6)
    alone = sample_latents_naive  # the naive sampler runs the unconditional block with an empty context
    seen_naive = []
    monkeypatch.setattr(flow, "guided_velocity", lambda vc, vu, w, f=flow.guided_velocity: seen_naive.append(vu) or f(vc, vu, w))
    monkeypatch.setattr(images, "guided_velocity", flow.guided_velocity)
    alone(model, tok, PROMPTS[:1], [7], s)
    torch.testing.assert_close(seen[0], seen_naive[0].view_as(seen[0]), atol=1e-5, rtol=1e-5)


def write_png(path, size=(80, 64), bits=8):
    arr = (np.random.default_rng(0).random(size[::-1]) * (255 if bits == 8 else 65535)).astype(np.uint8 if bits == 8 else np.uint16)
    Image.fromarray(arr).save(path)
    return path


def test_report_cli(folder, tmp_path, capsys):
    img = write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", bits=16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["report", str(img), "--weights", str(folder), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    out = tmp_path / "r.jsonl"
    code = main(["report", str(tmp_path), "--weights", str(folder), "--max-new-tokens", "5", "--out", str(out), "-q"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 1 and [r["id"] for r in rows] == ["a", "b", "bad"]
    assert rows[2]["report"] is None and "bad.png" in rows[2]["error"] and rows[0]["report"] is not None


def test_generate_cli(folder, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "Small left effusion.", "Normal chest.", "--weights", str(folder), "--steps", "4",
            "--size", "64", "--out", str(out), "--seed", "3", "-q"]
    assert main(args) == 0
    img = np.asarray(Image.open(out / "prompt000.png"))
    assert img.shape == (64, 64) and img.dtype == np.uint8
    side = json.loads((out / "prompt001.json").read_text())
    assert side["seed"] == 4 and side["prompt"] == "Normal chest." and (out / "manifest.jsonl").is_file()
    assert main(args) == 2  # never overwrites silently
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_sampling_json_sets_the_folders_defaults_and_flags_still_win(folder, tmp_path, capsys):
    """A weights folder's sampling.json replaces the release's sampling defaults; a flag beats both;
    a bad file is one error naming it."""
    import shutil

    own = tmp_path / "w"
    shutil.copytree(folder, own)
    base = ["generate", "Small left effusion.", "--weights", str(own), "--size", "64", "--steps", "3", "-q", "--overwrite"]

    def side(*extra):
        assert main(base + ["--out", str(tmp_path / "o")] + list(extra)) == 0
        return json.loads((tmp_path / "o" / "prompt000.json").read_text())

    got = side()
    assert got["guidance"] == 2.0 and got["shift"] == 3.0
    (own / "sampling.json").write_text(json.dumps({"guidance": 3.5, "interval": [0.2, 1.0]}))
    got = side()
    assert got["guidance"] == 3.5 and got["guidance_interval"] == [0.2, 1.0] and got["shift"] == 3.0
    assert side("--guidance", "1.5")["guidance"] == 1.5
    assert load_pipeline(own, device="cpu").image_settings(size=64).guidance == 3.5
    for bad, message in (({"guidence": 3}, "unknown key 'guidence'"), ({"steps": 2.5}, "steps = 2.5"), ("[", "not readable JSON")):
        (own / "sampling.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert main(base + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and "sampling.json" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "  ", "--size", "64"], "empty"),
        (["generate", "x", "--size", "72"], "multiple of 16"),
        (["generate", "x", "--size", "512"], "latent table"),
        (["generate", "effusion " * 3000, "--size", "64"], "more than the context"),
        (["report", "missing.png"], "no such file"),
        (["report", "x.png", "--device", "cuda"], "CUDA"),
    ],
)
def test_bad_inputs_give_one_line(folder, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "report" and argv[1] == "x.png":
        write_png(tmp_path / "x.png")
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    code = main(argv + ["--weights", str(folder), "-q"] + (["--out", "o"] if argv[0] == "generate" else []))
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("unix: error")]) >= 1


def test_missing_weights_folder(tmp_path, capsys):
    assert main(["generate", "x", "--weights", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "weights folder not found" in capsys.readouterr().err


def test_pipeline_step_capture(folder):
    from unix.errors import UserError

    assert load_pipeline(folder, device="cpu").cfg.step_capture == "auto"
    assert load_pipeline(folder, device="cpu", step_capture="eager").cfg.step_capture == "eager"
    for bad, message in (("always", "unknown step capture"), ("graph", "CUDA graphs")):
        with pytest.raises(UserError, match=message):
            load_pipeline(folder, device="cpu", step_capture=bad)


def test_pipeline_api(folder, tmp_path):
    pipe = load_pipeline(folder, device="cpu")
    imgs = pipe.images(["Small left effusion."], [0], ImageSettings(size=64, steps=3))
    again = pipe.images(["Small left effusion."], [0], ImageSettings(size=64, steps=3))
    assert imgs[0].shape == (64, 64) and np.array_equal(imgs[0], again[0])
    assert isinstance(pipe.reports([str(write_png(tmp_path / "p.png"))], ReportSettings(max_new_tokens=3))[0], str)
