"""Our SigLIP tower against transformers' SiglipVisionModel, and its released-name layout."""

import json
from pathlib import Path

import pytest
import torch

from unix.config import load_model_config
from unix.errors import UserError
from unix.models.vision import Connector, SiglipVisionTower, normalize_pixels
from unix.weights.siglip import siglip_hf_to_unix

LAYOUT = Path("/work/shared/reference/unix_released_checkpoint_layout.json")
PREFIX = "vit_model.vision_tower."


def hf_siglip(vc):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=vc.width, intermediate_size=vc.mlp_dim, num_hidden_layers=vc.depth, num_attention_heads=vc.num_heads,
        image_size=vc.image_size, patch_size=vc.patch_size, hidden_act="gelu", layer_norm_eps=vc.ln_eps,
        vision_use_head=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases away from their init
    return model


@pytest.fixture(scope="module")
def tiny():
    vc = load_model_config("tiny").vision
    return vc, hf_siglip(vc)


def test_matches_transformers_siglip(tiny):
    vc, hf = tiny
    vision = getattr(hf, "vision_model", hf)  # transformers 5 dropped the `vision_model` wrapper
    assert hf.config.hidden_act == "gelu" and not hasattr(vision, "head")  # exact GELU, no pool head
    ours = SiglipVisionTower(vc).eval()
    ours.load_state_dict(siglip_hf_to_unix(hf.state_dict(), vc), strict=True)
    x = torch.randn(2, 3, vc.image_size, vc.image_size)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        got = ours(x)
    # last_hidden_state is post_layernorm(last block), the same as our final `norm`.
    torch.testing.assert_close(out.last_hidden_state, vision.post_layernorm(out.hidden_states[-1]))
    assert got.shape == (2, vc.num_patches, vc.width)
    torch.testing.assert_close(got, out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_both_key_prefixes_map_the_same(tiny):
    # transformers 5 saves SiglipVisionModel keys bare; 4.x and full SiglipModel files (such as
    # google/siglip-large-patch16-384) put them under `vision_model.`, next to `text_model.*`.
    vc, hf = tiny
    sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    full = {f"vision_model.{k}": v for k, v in sd.items()} | {"vision_model.head.probe": torch.zeros(1, 1, vc.width)}
    full |= {"text_model.head.weight": torch.zeros(2, 2), "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1)}
    a, b = siglip_hf_to_unix(sd, vc), siglip_hf_to_unix(full, vc)  # head, text tower, scalars: ignored
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mapping_is_strict(tiny):
    vc, hf = tiny
    sd = {f"vision_model.{k.removeprefix('vision_model.')}": v for k, v in hf.state_dict().items()}
    k_bias = next(k for k in sd if "layers.1.self_attn.k_proj.bias" in k)
    with pytest.raises(UserError, match=r"missing: blocks\.1\.attn\.qkv\.bias \(no k_proj\)"):
        siglip_hf_to_unix({k: v for k, v in sd.items() if k != k_bias}, vc)
    with pytest.raises(UserError, match=r"missing: norm\.weight"):
        siglip_hf_to_unix({k: v for k, v in sd.items() if "post_layernorm.weight" not in k}, vc)
    with pytest.raises(UserError, match=r"unexpected: vision_model\.encoder\.extra\.weight"):
        siglip_hf_to_unix({**sd, "vision_model.encoder.extra.weight": torch.zeros(1)}, vc)
    with pytest.raises(UserError, match=r"12 unexpected: .*encoder\.layers\.1\.mlp\.fc1\.bias"):
        siglip_hf_to_unix(sd, load_model_config("tiny", ["vision.depth=1"]).vision)  # a block too many
    with pytest.raises(UserError, match=r"wrong shape: .*position_embedding.* -> pos_embed"):
        siglip_hf_to_unix(sd, load_model_config("tiny", ["vision.image_size=48"]).vision)


def test_names_and_shapes_match_the_release():
    released = json.loads(LAYOUT.read_text())["tensors"]
    want = {k[len(PREFIX):]: tuple(v) for k, v in released.items() if k.startswith(PREFIX) and ".attn_pool." not in k}
    with torch.device("meta"):
        tower = SiglipVisionTower(load_model_config("unix").vision)
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == want
    assert want["pos_embed"] == (1, 576, 1024) and len(want) == 5 + 24 * 12  # pos, patch w/b, norm w/b; 12 per block


def test_input_size_is_enforced():
    vc = load_model_config("tiny").vision
    tower = SiglipVisionTower(vc)
    S = vc.image_size
    for shape in [(1, 3, S, S - 16), (1, 1, S, S), (3, S, S)]:  # not square, grey, unbatched
        with pytest.raises(ValueError, match="expects"):
            tower(torch.zeros(shape))


def test_connector_gelu_variants_differ():
    torch.manual_seed(0)
    exact = Connector(8, 16, "gelu")
    tanh = Connector(8, 16, "gelu_tanh")
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(64, 8) * 3
    diff = (exact(x) - tanh(x)).abs().max()
    assert 0 < diff < 1e-2  # same weights; only the GELU approximation differs, and only slightly
    with pytest.raises(ValueError, match="gelu_tanh"):
        Connector(8, 16, "relu")


def test_normalize_pixels():
    vc = load_model_config("unix").vision
    px = normalize_pixels(torch.ones(2, 1, 4, 4), vc)
    assert px.shape == (2, 3, 4, 4)
    assert torch.equal(px[:, 0], px[:, 2])
    assert abs(float(px[0, 0, 0, 0]) - 1.3203) < 1e-4  # white -> (1 - 0.555895)/0.336385 (compat appendix A)
    rgb = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(normalize_pixels(rgb, vc), (rgb - vc.image_mean) / vc.image_std)
    with pytest.raises(ValueError):
        normalize_pixels(torch.ones(1, 2, 4, 4), vc)
