"""BioViL-T image-text alignment (`unix.eval.biovil`) on tiny random checkpoints in the released formats.

Both weight files are written with the REAL tensor names: the image file as hi-ml's
`ImageModel(RESNET50_MULTI_IMAGE).state_dict()` (tiny channel widths, full ResNet-50 depth, the
unused temporal pooler and ImageNet head included), the text file as the HF CXRBertModel save
(BertForMaskedLM + cls_projection_head, with the old `position_ids` buffer). Weights are a pure
function of (name, shape), so the oracle script below produced the same files.

The HIML_* fixtures were produced with hi-ml-multimodal 0.2.2 itself, in a separate venv (torch
2.13.0+cpu, torchvision 0.28.0 whose CUDA-only `torchvision::nms` fake registration was skipped so
that it imports, timm 1.0.29, transformers 4.57.6, scikit-image 0.26.0, Pillow 13.0.0): a script
imported the helpers of this file, wrote the same files, built hi-ml's ImageModel(RESNET50_MULTI_IMAGE,
pretrained_model_path=<our .pt>) (its strict load_state_dict accepted the file),
create_chest_xray_transform_for_inference(512, 448), CXRBertTokenizer/CXRBertModel.from_pretrained
(no missing or unexpected keys), and called TextInferenceEngine.get_embeddings_from_prompt,
transform(load_image(path)) and ImageTextInferenceEngine.get_similarity_score_from_raw_data.
"""

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unix.errors import UserError
from unix.eval.biovil import (
    IMAGE_WEIGHTS_FILE,
    AlignmentScorer,
    load_alignment_scorer,
    load_text_encoder,
    load_tokenizer,
    model_text,
    round_like_authors,
)
from unix.eval.biovil_image import (
    BioViLImageEncoder,
    ImageEncoderConfig,
    ResNet50Trunk,
    checkpoint_layout,
    load_image_encoder,
    preprocess,
    read_image,
)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?", "no", "pleural", "effusion", "heart",
         "size", "is", "normal", "the", "lungs", "are", "clear", "left", "pneumo", "##thorax", "mild", "card", "##io", "##mega",
         "##ly", "small", "right", "there"]
TEXT_CONFIG = {"vocab_size": len(WORDS), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": 24, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
               "projection_size": 16}
TEXT_CONFIG_128 = {**TEXT_CONFIG, "projection_size": 128}  # for the full-size image model's joint space
TINY_IMAGE = ImageEncoderConfig(width=4, temporal_dim=8, joint_dim=16)
PROMPTS = ["No pleural effusion.", "Mild cardiomegaly!!", "the heart size is normal. ", "left pneumothorax?", "Lungs are clear"]
BAD_PROMPTS = ["no [SEP] effusion", "lungs are clear " * 8]  # a special token; 24+ tokens


# --- files in the released formats -------------------------------------------------------------------


def fake_tensor(name: str, shape) -> torch.Tensor:
    """A tensor that depends only on its name and shape, scaled so a deep random net stays finite."""
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
        return torch.tensor(0)
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g)
    if name.endswith("running_var"):
        return 0.5 + noise.abs()
    if name.endswith(("running_mean", "bias")):
        return 0.1 * noise
    if len(shape) <= 1 and name.endswith("weight"):  # norm scales; small on the residual branch
        return (0.2 if ".bn3." in name else 1.0) * (1 + 0.1 * noise)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return noise * (2.0 / fan_in) ** 0.5


def write_image_checkpoint(path: Path, layout: dict, edit=None) -> None:
    state = {name: fake_tensor(name, shape) for name, shape in layout.items()}
    if edit:
        edit(state)
    torch.save(state, path)


def image_layout(cfg: ImageEncoderConfig) -> dict:
    with torch.device("meta"):
        return checkpoint_layout(BioViLImageEncoder(cfg))


def text_layout(cfg: dict) -> dict:
    """The HF CXRBertModel file: BertForMaskedLM (no pooler) + cls_projection_head + position_ids."""
    H, V, I, P = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["projection_size"]
    out = {"bert.embeddings.position_ids": (1, cfg["max_position_embeddings"]), "bert.embeddings.word_embeddings.weight": (V, H),
           "bert.embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], H),
           "bert.embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], H),
           "bert.embeddings.LayerNorm.weight": (H,), "bert.embeddings.LayerNorm.bias": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name, shape in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)), ("attention.self.value", (H, H)),
                            ("attention.output.dense", (H, H)), ("attention.output.LayerNorm", (H,)),
                            ("intermediate.dense", (I, H)), ("output.dense", (H, I)), ("output.LayerNorm", (H,))):
            out[p + name + ".weight"], out[p + name + ".bias"] = shape, (shape[0],)
    out.update({"cls.predictions.bias": (V,), "cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
                "cls.predictions.transform.LayerNorm.weight": (H,), "cls.predictions.transform.LayerNorm.bias": (H,),
                "cls.predictions.decoder.weight": (V, H), "cls.predictions.decoder.bias": (V,)})
    for name, shape in (("dense_to_hidden", (P, H)), ("LayerNorm", (P,)), ("dense_to_output", (P, P))):
        out[f"cls_projection_head.{name}.weight"], out[f"cls_projection_head.{name}.bias"] = shape, (P,)
    return out


def write_text_files(folder: Path, fmt: str = "bin", edit=None, cfg: dict = TEXT_CONFIG) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    config = {"architectures": ["CXRBertModel"], "model_type": "cxr-bert", **cfg}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "CXRBertTokenizer"}))
    state = {name: fake_tensor(name, shape) for name, shape in text_layout(cfg).items()}
    if edit:
        edit(state)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")


def make_images(folder: Path) -> dict[str, Path]:
    """Constructed X-ray-like images: every orientation, mode and file type the reader handles."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:720, 0:720].astype(np.float64)
    field = 0.5 + 0.25 * np.sin(xx / 37.0) * np.cos(yy / 23.0) + 0.2 * (xx + yy) / 1440  # in [0, 1]
    u8 = lambda a: (a * 255).clip(0, 255).astype(np.uint8)  # noqa: E731
    images = {
        "wide_gray.png": Image.fromarray(u8(field[:520, :600])),  # resized to 590 x 512, crop offset 71
        # 500 x 703 -> 512 x 719: crop top round(135.5) = 136, where flooring would give 135
        "tall_rgb.png": Image.fromarray(np.dstack([u8(field[:703, :500]), u8(field[:703, :500] ** 2), u8(1 - field[:703, :500])])),
        "small_gray.jpg": Image.fromarray(u8(0.1 + 0.6 * field[:300, :300])),  # upsampled; stretched first
        # 16-bit, 530 x 701 -> 512 x 677: crop top round(114.5) = 114 (halves to even), not 115
        "deep.png": Image.fromarray((field[:701, :530] * 40000).astype(np.uint16)),
        "flat.png": Image.fromarray(np.full((512, 512), 90, np.uint8)),  # constant: hi-ml makes it all zeros
    }
    paths = {}
    for name, img in images.items():
        paths[name] = folder / name
        img.save(paths[name], quality=90) if name.endswith(".jpg") else img.save(paths[name])
    return paths


def tiny_folder(tmp_path: Path, image_edit=None, text_edit=None, fmt="bin") -> Path:
    folder = tmp_path / "weights" / "biovil-t"
    write_text_files(folder, fmt, text_edit)
    write_image_checkpoint(folder / IMAGE_WEIGHTS_FILE, image_layout(TINY_IMAGE), image_edit)
    return folder


# --- fixtures from the hi-ml oracle ----------------------------------------------------------------------

# sha256 of "name [shape]" lines, sorted, of hi-ml ImageModel(RESNET50_MULTI_IMAGE, 128).state_dict() (372 tensors)
HIML_IMAGE_LAYOUT_SHA256 = "db45d152809227d6503ec8c3c4ff8eebbcaa7857786ab3367cc2c4f4dd80e4ca"
# hi-ml transform(load_image(path)) channel 0 as uint8 (x * 255, exact), sha256 of its bytes
HIML_PREPROCESS_SHA256 = {
    "wide_gray.png": "26a5466695e5efb7fbf8c5003731969c55f6922db678129b3df91c0608e5e830",
    "tall_rgb.png": "764b859274b910048eff9adb31d9b27b561ea3260d57c665c674ca5fe13912be",
    "small_gray.jpg": "79a27b3bd6ec4812647e58fa2119c2a7d7f9a80a9f1482f98755b863985f1b95",
    "deep.png": "9e1ad6da1fa40f37e86bccee87e04e9e51dbb090f32c620289b04b7332e2dc4b",
    "flat.png": "ba0ee4b797b99449ebc7396d09562a0f64ec8795eabf62376fe36e289fb0f3c8",
}
# hi-ml TextInferenceEngine.get_embeddings_from_prompt(p, normalize=False) on the TEXT_CONFIG files (6 decimals)
HIML_TEXT_EMBEDDINGS = {
    "No pleural effusion.": [1.181937, -0.184692, -0.442565, 0.492601, 0.462646, 2.705726, -0.444805, -2.326898, -0.890319, 0.697478, -0.755684, -1.828638, -0.044885, -0.024898, 0.546483, 0.738637],
    "Mild cardiomegaly!!": [0.930631, -1.355857, 0.028297, -0.247818, 0.734858, 2.565006, 0.349767, -1.880158, -0.151240, 0.240027, -0.350955, -1.400423, -0.202745, 0.005131, -0.195054, 1.647528],
    "the heart size is normal. ": [1.412191, -0.385789, -0.498146, 0.511829, 0.335180, 2.078909, -0.197946, -2.421447, -1.181167, -0.329143, -1.121124, -1.649329, 0.092975, 0.187817, 0.456870, 1.196928],
    "left pneumothorax?": [0.416237, 1.432837, 0.770207, -0.026897, 1.413479, 1.658710, -1.162601, -1.341084, -0.423377, 0.021569, -1.544554, -1.219371, -0.472495, -1.021446, -0.491699, 0.744615],
    "Lungs are clear": [1.321627, 0.108603, -0.768975, 0.672236, 0.351592, 2.313384, -0.313444, -2.101402, -1.139988, 0.117416, -1.049302, -2.054986, 0.220008, 0.060535, 0.629288, 0.582909],
}
# hi-ml ImageTextInferenceEngine.get_similarity_score_from_raw_data(image, prompt): the full-size image
# model (fake_tensor weights on hi-ml's own layout) with the TEXT_CONFIG_128 text files
HIML_SCORES = {
    ("wide_gray.png", "No pleural effusion."): -0.04416888207197189,
    ("tall_rgb.png", "Mild cardiomegaly!!"): 0.07222215086221695,
    ("small_gray.jpg", "the heart size is normal. "): -0.031120197847485542,
    ("deep.png", "left pneumothorax?"): 0.029533440247178078,
    ("flat.png", "Lungs are clear"): -0.01760760322213173,
    ("wide_gray.png", "Lungs are clear"): -0.06389021873474121,
    ("deep.png", "Lungs are clear"): -0.06366950273513794,
}


# --- loading ------------------------------------------------------------------------------------------------


def test_image_layout_is_himl_layout():
    layout = image_layout(ImageEncoderConfig())
    lines = "\n".join(f"{k} {list(v)}" for k, v in sorted(layout.items()))
    assert len(layout) == 372
    assert hashlib.sha256(lines.encode()).hexdigest() == HIML_IMAGE_LAYOUT_SHA256
    assert layout["encoder.encoder.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert layout["projector.model.0.weight"] == (128, 512, 1, 1)  # 256 reduced + 256 "no previous image"


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("encoder.encoder.layer3.2.bn2.running_var"), "1 missing: encoder.encoder.layer3.2.bn2.running_var"),
    (lambda s: s.pop("encoder.vit_pooler.blocks.1.attn.proj_k.weight"), "1 missing: encoder.vit_pooler.blocks.1.attn.proj_k.weight"),
    (lambda s: s.__setitem__("encoder.encoder.layer4.3.conv1.weight", torch.zeros(32, 128, 1, 1)), "1 unexpected: encoder.encoder.layer4.3.conv1.weight"),
    (lambda s: s.__setitem__("projector.model.3.bias", torch.zeros(15)), "projector.model.3.bias: file [15] vs model [16]"),
])
def test_image_loader_is_strict(tmp_path, edit, needle):
    write_image_checkpoint(tmp_path / IMAGE_WEIGHTS_FILE, image_layout(TINY_IMAGE), edit)
    with pytest.raises(UserError, match="does not fit the BioViL-T image model") as e:
        load_image_encoder(tmp_path / IMAGE_WEIGHTS_FILE)
    assert needle in str(e.value)


def test_image_loader_reads_sizes_and_keeps_unused_tensors_out(tmp_path):
    write_image_checkpoint(tmp_path / IMAGE_WEIGHTS_FILE, image_layout(TINY_IMAGE))
    model, unused = load_image_encoder(tmp_path / IMAGE_WEIGHTS_FILE)
    assert model.cfg == TINY_IMAGE and not model.training
    assert len(unused) == 2 + 3 + 3 * 13  # fc weight+bias; type_embed, norm_post; 13 tensors per pooler block
    assert torch.equal(model.proj_out.bias, fake_tensor("projector.model.3.bias", (16,)))
    assert torch.equal(model.trunk.layer2[0].downsample[1].running_var, fake_tensor("encoder.encoder.layer2.0.downsample.1.running_var", (32,)))


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("cls_projection_head.LayerNorm.bias"), "1 missing: cls_projection_head.LayerNorm.bias"),
    (lambda s: s.pop("bert.encoder.layer.1.output.dense.weight"), "1 missing: bert.encoder.layer.1.output.dense.weight"),
    (lambda s: s.__setitem__("bert.pooler.dense.weight", torch.zeros(32, 32)), "1 unexpected: bert.pooler.dense.weight"),
    (lambda s: s.__setitem__("cls_projection_head.dense_to_output.weight", torch.zeros(16, 15)), "file [16, 15] vs model [16, 16]"),
])
def test_text_loader_is_strict(tmp_path, edit, needle):
    write_text_files(tmp_path, edit=edit)
    with pytest.raises(UserError, match="does not fit CXR-BERT") as e:
        load_text_encoder(tmp_path)
    assert needle in str(e.value)


def test_text_loader_takes_either_file_format_and_optional_tensors(tmp_path):
    def drop(state):  # a save without the tied MLM copies and without the old buffer
        for name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.embeddings.position_ids"):
            state.pop(name)

    write_text_files(tmp_path / "bin")
    write_text_files(tmp_path / "st", fmt="safetensors", edit=drop)
    a, b = load_text_encoder(tmp_path / "bin"), load_text_encoder(tmp_path / "st")
    assert not (tmp_path / "st" / "pytorch_model.bin").exists()
    ids, mask = torch.tensor([[2, 40, 41, 3]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(a(ids, mask), b(ids, mask))


def test_missing_weights_name_every_file(tmp_path):
    (tmp_path / "biovil-t").mkdir()
    (tmp_path / "biovil-t" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(UserError) as e:
        load_alignment_scorer(tmp_path / "biovil-t", "cpu")
    msg = str(e.value)
    assert "missing (biovil_t_image_model_proj_size_128.pt, config.json, model.safetensors or pytorch_model.bin)" in msg
    assert "microsoft/BiomedVLP-BioViL-T" in msg and "tokenizer_config.json" in msg


# --- the model ------------------------------------------------------------------------------------------------


def hf_resnet_name(ours: str) -> str:
    """Our (torchvision) trunk names -> transformers ResNetModel names."""
    import re

    if ours.startswith(("conv1.", "bn1.")):
        return "embedder.embedder." + ("convolution." if ours.startswith("conv1.") else "normalization.") + ours.split(".", 1)[1]
    stage, block, part, rest = re.match(r"layer(\d)\.(\d+)\.(\w+?\d?)\.(.+)", ours).groups()
    prefix = f"encoder.stages.{int(stage) - 1}.layers.{block}."
    if part == "downsample":
        index, leaf = rest.split(".", 1)
        return prefix + ("shortcut.convolution." if index == "0" else "shortcut.normalization.") + leaf
    kind, j = part[:-1], int(part[-1]) - 1  # conv1..3 / bn1..3
    return prefix + f"layer.{j}." + ("convolution." if kind == "conv" else "normalization.") + rest


def hf_resnet(width: int, trunk_state: dict):
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=width, hidden_sizes=[width * 4 * 2**s for s in range(4)], depths=[3, 4, 6, 3],
                       layer_type="bottleneck", downsample_in_first_stage=False, downsample_in_bottleneck=False)
    model = ResNetModel(cfg).eval()
    model.load_state_dict({hf_resnet_name(k): v for k, v in trunk_state.items()}, strict=True)
    return model


def test_resnet_trunk_matches_transformers_resnet():
    trunk = ResNet50Trunk(width=4).eval()
    state = {k: fake_tensor(k, v.shape) for k, v in trunk.state_dict().items()}
    trunk.load_state_dict(state)
    reference = hf_resnet(4, state)
    x = torch.randn(2, 3, 70, 50, generator=torch.Generator().manual_seed(0))  # odd sizes: padding and strides
    with torch.no_grad():
        ours, theirs = trunk(x), reference(pixel_values=x).last_hidden_state
    assert ours.shape == (2, 128, 3, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_text_embeddings_match_himl(tmp_path):
    write_text_files(tmp_path)
    encoder, tokenizer = load_text_encoder(tmp_path), load_tokenizer(tmp_path)
    enc = tokenizer([model_text(p, []) for p in PROMPTS], padding="longest", return_tensors="pt")  # batched: hi-ml does one at a time
    with torch.no_grad():
        got = encoder(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, torch.tensor([HIML_TEXT_EMBEDDINGS[p] for p in PROMPTS]), rtol=0, atol=2e-6)


def test_score_is_the_cosine_of_the_two_projections(tmp_path):
    """Recomputed from the raw file tensors with transformers' ResNetModel and BertModel and
    functional ops: normalise both projections, take the dot product, no temperature."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tiny_folder(tmp_path)
    paths = make_images(tmp_path / "images")
    images = [paths["wide_gray.png"], paths["tall_rgb.png"], paths["deep.png"]]
    prompts = ["No pleural effusion.", "Mild cardiomegaly!!", "No pleural effusion."]
    got = load_alignment_scorer(folder, "cpu").scores(images, prompts, batch_size=2)

    s = torch.load(folder / IMAGE_WEIGHTS_FILE)
    resnet = hf_resnet(4, {k.removeprefix("encoder.encoder."): v for k, v in s.items()
                           if k.startswith("encoder.encoder.") and not k.startswith("encoder.encoder.fc.")})
    pixels = torch.stack([preprocess(read_image(p)) for p in images])
    with torch.no_grad():
        patches = F.conv2d(resnet(pixel_values=pixels).last_hidden_state, s["encoder.backbone_to_vit.weight"])
        fused = torch.cat([patches, s["encoder.missing_previous_emb"].expand(3, -1, *patches.shape[2:])], dim=1)
        h = F.conv2d(fused, s["projector.model.0.weight"])
        h = F.relu(F.batch_norm(h, s["projector.model.1.running_mean"], s["projector.model.1.running_var"],
                                s["projector.model.1.weight"], s["projector.model.1.bias"], training=False, eps=1e-5))
        image = F.conv2d(h, s["projector.model.3.weight"], s["projector.model.3.bias"]).mean(dim=(2, 3))

        t = torch.load(folder / "pytorch_model.bin")
        bert = BertModel(BertConfig(**{k: v for k, v in TEXT_CONFIG.items() if k != "projection_size"}), add_pooling_layer=False).eval()
        bert.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("bert.") and not k.endswith("position_ids")})
        tokens = BertTokenizer(vocab=str(folder / "vocab.txt"))([p.rstrip("!?.") for p in prompts], padding=True, return_tensors="pt")
        cls = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
        p = "cls_projection_head."
        x = F.gelu(F.linear(cls, t[p + "dense_to_hidden.weight"], t[p + "dense_to_hidden.bias"]))
        x = F.layer_norm(x, (16,), t[p + "LayerNorm.weight"], t[p + "LayerNorm.bias"], eps=1e-12)
        text = F.linear(x, t[p + "dense_to_output.weight"], t[p + "dense_to_output.bias"])
    expected = F.cosine_similarity(image, text).tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    assert len({round(v, 4) for v in got}) == 3  # the image matters, not only the prompt


# --- input preparation ---------------------------------------------------------------------------------------


def test_preprocessing_matches_himl(tmp_path):
    for name, path in make_images(tmp_path).items():
        x = preprocess(read_image(path))
        assert x.shape == (3, 448, 448) and x.dtype == torch.float32
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
        u8 = (x[0] * 255).round().to(torch.uint8)
        assert torch.equal(u8.float() / 255, x[0])
        assert hashlib.sha256(u8.numpy().tobytes()).hexdigest() == HIML_PREPROCESS_SHA256[name], name


def test_preprocessing_is_the_documented_ops(tmp_path):
    """Stretch to 0..255 (truncating), shorter side to 512 (Pillow bilinear, longer side truncated),
    centre 448 crop with rounded offsets, /255, three equal channels; no normalisation."""
    path = make_images(tmp_path)["wide_gray.png"]  # 600 x 520
    a = np.asarray(Image.open(path)).astype(np.float64)
    a = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    img = Image.fromarray(a).resize((590, 512), Image.BILINEAR).crop((71, 32, 71 + 448, 32 + 448))
    expected = torch.from_numpy(np.asarray(img).astype(np.float32) / 255)
    assert torch.equal(preprocess(read_image(path))[2], expected)
    assert np.asarray(read_image(make_images(tmp_path)["flat.png"])).max() == 0  # constant image -> zeros, as hi-ml


def test_prompt_preparation():
    assert model_text("Mild cardiomegaly!!", ["[SEP]"]) == "Mild cardiomegaly"
    assert model_text("heart size is normal. ", ["[SEP]"]) == "heart size is normal. "  # only trailing !?. go
    assert model_text("no [MASK] effusion.", ["[SEP]"]) == "no [MASK] effusion"
    with pytest.raises(ValueError, match=r"\[SEP\]"):
        model_text("no [SEP] effusion", ["[UNK]", "[SEP]"])


def test_refused_items_are_reported_and_the_rest_scored(tmp_path):
    scorer = load_alignment_scorer(tiny_folder(tmp_path), "cpu")
    paths = make_images(tmp_path / "images")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images = [paths["wide_gray.png"], paths["wide_gray.png"], tmp_path / "broken.png", tmp_path / "absent.png", paths["deep.png"]]
    prompts = [BAD_PROMPTS[0], BAD_PROMPTS[1], "Lungs are clear", "Lungs are clear", "Lungs are clear"]
    scores, errors = scorer.score_all(images, prompts, batch_size=4)
    assert set(errors) == {0, 1, 2, 3} and scores[4] is not None and scores[:4] == [None] * 4
    assert "special token [SEP]" in errors[0] and "more than CXR-BERT's 24" in errors[1]  # hi-ml: 26 > 24
    assert "broken.png" in errors[2] and "absent.png" in errors[3]
    with pytest.raises(UserError, match="item 0"):
        scorer.scores(images, prompts)


def test_round_like_authors():
    # the authors' formula on these scores: [round(s, 3) ...], round(np.mean(...), 3) -> as below
    rounded, mean = round_like_authors([0.0625, 0.12349999, 0.5, 0.0015, -0.0305, 0.6355])
    assert rounded == [0.062, 0.123, 0.5, 0.002, -0.03, 0.635] and mean == 0.215


# --- the command ---------------------------------------------------------------------------------------------------


def test_cli_with_the_authors_prompt_csv(tmp_path, capsys):
    import csv

    from unix.cli import main

    tiny_folder(tmp_path)
    paths = make_images(tmp_path / "gen")
    rows = [("wide_gray.png", "No pleural effusion."), ("tall_rgb.png", "Mild cardiomegaly!!"), ("deep.png", "Lungs are clear"),
            ("gone.png", "Lungs are clear"), ("flat.png", BAD_PROMPTS[0])]
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "annotated_prompt", "synthetic_filename", "chexpert_labels"])
        w.writerows([(i, p, name, "{}") for i, (name, p) in enumerate(rows)])
    out = tmp_path / "alignment.json"
    argv = ["eval", "alignment", "--images", str(tmp_path / "gen"), "--prompts", str(tmp_path / "prompts.csv"),
            "--weights-dir", str(tmp_path / "weights"), "--out", str(out), "--device", "cpu", "--batch-size", "2"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_scored"] == 3 and result["n_skipped"] == 2
    assert [s["id"] for s in result["skipped"]] == ["gone", "flat"]
    expected = load_alignment_scorer(tmp_path / "weights" / "biovil-t", "cpu").scores([paths[n] for n, _ in rows[:3]], [p for _, p in rows[:3]])
    assert [it["score"] for it in result["items"]] == pytest.approx(expected, abs=1e-6)
    assert result["alignment"] == round_like_authors([it["score"] for it in result["items"]])[1]
    assert f"Alignment (BioViL-T): {result['alignment']:.3f} over 3 images, 2 skipped" in capsys.readouterr().out
    assert main(argv) == 2  # --out exists and no --overwrite
    assert main(argv + ["--overwrite"]) == 0


def test_cli_with_id_prompt_jsonl_and_missing_weights(tmp_path, capsys):
    from unix.cli import main

    paths = make_images(tmp_path / "gen")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "small_gray", "prompt": "left pneumothorax?"}) + "\n"
                                      + json.dumps({"id": "wide_gray", "prompt": "Lungs are clear"}) + "\n")
    argv = ["eval", "alignment", "--images", str(tmp_path / "gen"), "--prompts", str(tmp_path / "p.jsonl"), "--device", "cpu"]
    assert main(argv + ["--weights-dir", str(tmp_path / "none")]) == 2
    assert "BioViL-T weights missing" in capsys.readouterr().err
    tiny_folder(tmp_path)
    assert main(argv + ["--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path / "a.json")]) == 0
    items = json.loads((tmp_path / "a.json").read_text())["items"]
    assert [Path(it["image"]) for it in items] == [paths["small_gray.jpg"], paths["wide_gray.png"]]


@pytest.mark.slow
def test_full_size_scores_match_himl(tmp_path):
    folder = tmp_path / "biovil-t"
    write_text_files(folder, cfg=TEXT_CONFIG_128)
    write_image_checkpoint(folder / IMAGE_WEIGHTS_FILE, image_layout(ImageEncoderConfig()))
    paths = make_images(tmp_path / "images")
    pairs = list(HIML_SCORES)
    got = load_alignment_scorer(folder, "cpu").scores([paths[i] for i, _ in pairs], [p for _, p in pairs], batch_size=4)
    assert got == pytest.approx([HIML_SCORES[k] for k in pairs], abs=1e-6)
