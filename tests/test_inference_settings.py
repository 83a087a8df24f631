"""Weights-declared inference settings (inference.json, the release's values, flags), per-image
instructions, and the authors' test JSON and prompt CSV as inputs. Tiny random model on CPU."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import unix.infer.pipeline as pipeline_module
import unix.infer.reports as reports_module
import unix.weights.folder as folder_module
from unix.cli import main
from unix.config import load_model_config
from unix.errors import UserError
from unix.infer import ReportSettings, load_pipeline
from unix.infer.io import fit_image, read_image
from unix.infer.reports import generate_report_ids, generate_report_ids_uncached
from unix.models.unix import UniX
from unix.tokenizer import REPORT_INSTRUCTION, train_tokenizer
from unix.weights.inference import RELEASE, read_inference_file, resolve_inference
from unix.weights.folder import save_model

CORPUS = ["FINDINGS: The heart is enlarged. Small left pleural effusion. IMPRESSION: Cardiomegaly."] * 10 + [
    "Review this chest X-ray and provide the FINDINGS. No pneumothorax. Lungs are clear."
] * 10
SHORT = "Provide the FINDINGS."
LONG = "As a radiologist, analyze this X-ray and summarize the FINDINGS and IMPRESSION."
# inference/config.json of the authors' repository, abridged: what a released folder's config.json looks like.
AUTHORS_CONFIG = {"model_type": "unix", "architectures": ["UniX"], "connector_act": "gelu_pytorch_tanh",
                  "llm_config": {"model_type": "qwen2", "hidden_size": 2048}}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = UniX(cfg).eval()
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.2)
    return model, train_tokenizer(CORPUS, 300, cfg.tokens)


@pytest.fixture(scope="module")
def ours(tiny, tmp_path_factory):
    """One of our folders (config.json with "unix_model"), with a VAE for `unix generate`."""
    from unix.models.vae import LatentCodec, build_vae
    from unix.weights.ldm_vae import save_vae_safetensors

    model, tok = tiny
    path = save_model(model, tmp_path_factory.mktemp("w") / "ours")
    tok.save(path)
    (path / "vae").mkdir()
    torch.manual_seed(1)
    save_vae_safetensors(LatentCodec(build_vae(model.cfg.vae), model.cfg.vae), path / "vae" / "model.safetensors")
    return path


@pytest.fixture
def released(ours, tmp_path, monkeypatch):
    """A released-style folder: the authors' config.json (no "unix_model"). Its sizes would be the
    full `unix` preset; here that preset is the tiny one, so the folder loads in a test."""
    path = tmp_path / "UniX"
    shutil.copytree(ours, path)
    (path / "config.json").write_text(json.dumps(AUTHORS_CONFIG))
    tiny_cfg = load_model_config("tiny")
    monkeypatch.setattr(folder_module, "load_model_config", lambda name: tiny_cfg)
    return path


def write_image(path, size=(90, 60), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1]).astype(np.uint8)).save(path)
    return path


# ---- inference.json and where each setting comes from ----

def test_inference_file_is_read_strictly(tmp_path):
    assert read_inference_file(tmp_path) == {}
    (tmp_path / "inference.json").write_text(json.dumps({"double_bos": True, "max_new_tokens": 320, "resize": "thumbnail"}))
    assert read_inference_file(tmp_path) == {"double_bos": True, "max_new_tokens": 320, "resize": "thumbnail"}
    for bad, message in (({"double_boss": True}, "unknown key 'double_boss'"), ({"double_bos": "yes"}, "double_bos = 'yes'"),
                         ({"max_new_tokens": 0}, "max_new_tokens = 0"), ({"max_new_tokens": 2.5}, "max_new_tokens = 2.5"),
                         ({"resize": "stretch"}, "resize = 'stretch'"), ({"connector_act": "relu"}, "connector_act = 'relu'"),
                         ([1], "expected a JSON object"), ("{", "not readable JSON")):
        (tmp_path / "inference.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(UserError) as e:
            read_inference_file(tmp_path)
        assert message in str(e.value) and str(tmp_path / "inference.json") in str(e.value) and "\n" not in str(e.value)


def test_our_folder_gets_clean_defaults(ours):
    s = load_pipeline(ours, device="cpu").inference
    assert (s.double_bos, s.connector_act, s.max_new_tokens, s.resize) == (False, "gelu", 500, "letterbox")
    assert s.sources == {"double_bos": "default", "connector_act": "config.json", "max_new_tokens": "default", "resize": "default"}


def test_released_folder_gets_the_release_settings(released, tmp_path):
    pipe = load_pipeline(released, device="cpu")
    s = pipe.inference
    assert (s.double_bos, s.connector_act, s.max_new_tokens, s.resize) == (True, "gelu_tanh", 499, "thumbnail")
    assert set(s.sources.values()) == {"release"}
    bos = pipe.cfg.tokens.bos
    assert pipe.tokenizer.segment("x")[:3] == [bos, bos, *pipe.tokenizer.encode("x")[:1]]
    assert pipe.model.connector.approximate == "tanh" and pipe.cfg.vision.connector_act == "gelu_tanh"
    img = write_image(tmp_path / "a.png")
    expected = fit_image(read_image(img), 64, "thumbnail")
    got = pipe.pixels([str(img)])[0, 0] * pipe.cfg.vision.image_std + pipe.cfg.vision.image_mean
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    # The release's values give way to the folder's inference.json, and both to flags.
    (released / "inference.json").write_text(json.dumps({"double_bos": False, "resize": "letterbox"}))
    s = load_pipeline(released, device="cpu", max_new_tokens=40, resize="thumbnail").inference
    assert (s.double_bos, s.connector_act, s.max_new_tokens, s.resize) == (False, "gelu_tanh", 40, "thumbnail")
    assert s.sources == {"double_bos": "inference.json", "connector_act": "release", "max_new_tokens": "flag", "resize": "flag"}


def test_flags_override_the_folder(ours, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(ours, own)
    (own / "inference.json").write_text(json.dumps({"double_bos": True, "max_new_tokens": 7}))
    s = resolve_inference(own, load_model_config("tiny"), released=False, given={"double_bos": False, "connector_act": "gelu_tanh"})
    assert (s.double_bos, s.connector_act, s.max_new_tokens) == (False, "gelu_tanh", 7)
    assert s.sources["double_bos"] == "flag" and s.sources["max_new_tokens"] == "inference.json"
    with pytest.raises(UserError, match="--max-new-tokens = 0"):
        resolve_inference(own, load_model_config("tiny"), released=False, given={"max_new_tokens": 0})


def test_max_new_tokens_counts_tokens_after_the_start_token(tiny, monkeypatch):
    """N new tokens from N decoding forwards: the release's max_length=500 (start token included)
    is max_new_tokens=499."""
    model, tok = tiny
    eos, real_choose = model.cfg.tokens.eos, reports_module.choose
    monkeypatch.setattr(reports_module, "choose", lambda logits, *a: real_choose(logits.index_fill(-1, torch.tensor([eos]), -1e9), *a))
    forwards = []
    handle = model.decoder.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = generate_report_ids(model, tok, torch.randn(1, 3, 64, 64), ReportSettings(max_new_tokens=7))
    finally:
        handle.remove()
    assert len(out[0]) == 7 and len(forwards) == 1 + 7  # one prefill, seven decoding steps
    assert RELEASE["max_new_tokens"] == 499


# ---- per-image instructions ----

def test_each_row_gets_its_own_instruction_tokens(tiny, monkeypatch):
    model, tok = tiny
    packed, real_pack = [], reports_module.pack
    monkeypatch.setattr(reports_module, "pack", lambda *a, **k: packed.append(real_pack(*a, **k)) or packed[-1])
    generate_report_ids(model, tok, torch.randn(2, 3, 64, 64), ReportSettings(max_new_tokens=1), [SHORT, LONG])
    ids = packed[0].input_ids
    first = 2 + model.cfg.vision.num_patches  # after [BOI, ViT features, EOI]
    short, long = tok.segment(SHORT), tok.segment(LONG)
    assert len(short) < len(long)
    assert ids[0, first : first + len(short)].tolist() == short and not ids[0, first + len(short) :].any()  # then padding
    assert ids[1, first:].tolist() == long


def test_mixed_instruction_batch_equals_one_by_one(tiny):
    model, tok = tiny
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    instructions = [LONG, SHORT, REPORT_INSTRUCTION]
    s = ReportSettings(max_new_tokens=12)
    batched = generate_report_ids(model, tok, px, s, instructions)
    single = [generate_report_ids(model, tok, px[i : i + 1], s, instructions[i : i + 1])[0] for i in range(3)]
    assert batched == single
    assert batched == generate_report_ids_uncached(model, tok, px, s, instructions)
    assert batched[0] != generate_report_ids(model, tok, px[:1], s, [SHORT])[0]  # the instruction matters


def test_pipeline_reports_take_instructions(ours, tmp_path):
    pipe = load_pipeline(ours, device="cpu")
    paths = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(2)]
    s = ReportSettings(max_new_tokens=6)
    both = pipe.reports(paths, s, instructions=[LONG, SHORT])
    assert both == [pipe.reports(paths[:1], s, [LONG])[0], pipe.reports(paths[1:], s, [SHORT])[0]]
    with pytest.raises(UserError, match="2 images"):
        pipe.reports(paths, s, instructions=[LONG])


# ---- the CLI: settings in the output rows, the authors' files ----

def test_report_rows_record_settings_and_sources(released, tmp_path, monkeypatch):
    seen = []

    def spy(model, tokenizer, pixels, settings, instructions):
        seen.append((settings.max_new_tokens, list(instructions), tokenizer.double_bos))
        return [[5, 6]] * pixels.shape[0]

    monkeypatch.setattr(pipeline_module, "generate_report_ids", spy)  # the settings reach the decoder
    img = write_image(tmp_path / "a.png")
    out = tmp_path / "r.jsonl"
    assert main(["report", str(img), "--weights", str(released), "--out", str(out), "-q"]) == 0
    row = json.loads(out.read_text())
    assert seen[-1] == (499, [REPORT_INSTRUCTION], True)
    st = row["settings"]
    assert row["instruction"] == REPORT_INSTRUCTION
    assert (st["double_bos"], st["connector_act"], st["max_new_tokens"], st["resize"]) == (True, "gelu_tanh", 499, "thumbnail")
    assert st["sources"] == {"double_bos": "release", "connector_act": "release", "max_new_tokens": "release",
                             "resize": "release", "instruction": "default"}
    flags = ["--no-double-bos", "--connector-act", "gelu", "--max-new-tokens", "9", "--resize", "letterbox", "--instruction", SHORT]
    assert main(["report", str(img), "--weights", str(released), "--out", str(out), "-q"] + flags) == 2  # never overwrites
    assert main(["report", str(img), "--weights", str(released), "--out", str(out), "-q", "--overwrite"] + flags) == 0
    st = json.loads(out.read_text())["settings"]
    assert seen[-1] == (9, [SHORT], False)
    assert (st["double_bos"], st["connector_act"], st["max_new_tokens"], st["resize"]) == (False, "gelu", 9, "letterbox")
    assert set(st["sources"].values()) == {"flag"}


def test_report_reads_the_authors_test_file(ours, tmp_path):
    root = tmp_path / "mimic"
    images = ["files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg", "files/p11/p11000001/s50000001/0b3ee4b1-0a5d1e5c.jpg"]
    for i, rel in enumerate(images):
        write_image(root / rel, size=(70 + 30 * i, 90), seed=i)
    entries = [{"messages": [{"role": "user", "content": "<image>" + instr}, {"role": "assistant", "content": ref}], "images": [rel]}
               for rel, instr, ref in zip(images, [LONG, SHORT], ["FINDINGS: Clear. IMPRESSION: Normal.", "FINDINGS: Effusion."])]
    test_file = tmp_path / "test_data.json"
    test_file.write_text(json.dumps(entries))
    out = tmp_path / "reports.jsonl"
    argv = ["report", str(test_file), "--image-root", str(root), "--out", str(out), "--weights", str(ours), "--max-new-tokens", "6", "-q"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["02aa804e-bde0afdd", "0b3ee4b1-0a5d1e5c"]
    assert [r["instruction"] for r in rows] == [LONG, SHORT]
    assert rows[1]["reference"] == "FINDINGS: Effusion." and rows[0]["settings"]["sources"]["instruction"] == "input"
    pipe = load_pipeline(ours, device="cpu")  # the batch of two equals each image alone with its instruction
    for r, rel, instr in zip(rows, images, [LONG, SHORT]):
        assert r["report"] == pipe.reports([str(root / rel)], ReportSettings(max_new_tokens=6), [instr])[0]


def test_generate_names_outputs_from_the_authors_prompt_csv(ours, tmp_path):
    csv_path = tmp_path / "generations_with_metadata.csv"
    csv_path.write_text("id,annotated_prompt,synthetic_filename,path,chexpert_labels\n"
                        "7,Small left pleural effusion.,SyntheticImg_7.png,files/p10/a.jpg,\"{'Pleural Effusion': 1.0}\"\n"
                        "9,No acute process.,SyntheticImg_9,files/p10/b.jpg,{'No Finding': nan}\n")
    out = tmp_path / "gen"
    argv = ["generate", "--prompts-file", str(csv_path), "--weights", str(ours), "--size", "64", "--steps", "3", "--out", str(out), "-q"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["SyntheticImg_7.png", "SyntheticImg_9.png"]
    side = json.loads((out / "SyntheticImg_9.json").read_text())
    assert side["prompt"] == "No acute process." and side["seed"] == 1 and side["double_bos"] is False


def test_bad_inference_file_is_one_line(ours, tmp_path, capsys):
    own = tmp_path / "own"
    shutil.copytree(ours, own)
    (own / "inference.json").write_text(json.dumps({"max_new_token": 5}))
    img = write_image(tmp_path / "a.png")
    assert main(["report", str(img), "--weights", str(own), "-q"]) == 2
    err = capsys.readouterr().err
    assert "inference.json" in err and "unknown key 'max_new_token'" in err and "Traceback" not in err
    assert main(["weights", "check", str(own)]) == 2
    assert "unknown key 'max_new_token'" in capsys.readouterr().out


def test_weights_check_prints_the_settings(released, capsys):
    (released / "inference.json").write_text(json.dumps({"max_new_tokens": 300}))
    main(["weights", "check", str(released)])
    out = capsys.readouterr().out
    assert "double_bos = true  (release)" in out and "resize = \"thumbnail\"  (release)" in out
    assert "max_new_tokens = 300  (inference.json)" in out
