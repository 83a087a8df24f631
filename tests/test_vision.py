"""Our SigLIP tower against transformers' SiglipVisionModel, and its released-name layout."""

import copy

import pytest
import torch

from unix.config import load_model_config
from unix.errors import UserError
from unix.models.vision import Connector, SiglipVisionTower, normalize_pixels
from unix.weights.siglip import siglip_hf_to_unix


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


def test_matches_transformers_siglip():
    vc = load_model_config("tiny").vision
    hf = hf_siglip(vc)
    ours = SiglipVisionTower(vc).eval()
    ours.load_state_dict(siglip_hf_to_unix(hf.state_dict(), vc.depth), strict=True)
    x = torch.randn(2, 3, vc.image_size, vc.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state  # includes the post-layernorm
        got = ours(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mapping_is_strict():
    vc = load_model_config("tiny").vision
    sd = hf_siglip(vc).state_dict()
    key = next(k for k in sd if "self_attn.k_proj.bias" in k)
    with pytest.raises(UserError, match="missing"):
        siglip_hf_to_unix({k: v for k, v in sd.items() if k != key}, vc.depth)
    with pytest.raises(UserError, match="unexpected"):
        siglip_hf_to_unix({**sd, "encoder.extra.weight": torch.zeros(1)}, vc.depth)


def test_input_size_is_enforced():
    vc = load_model_config("tiny").vision
    with pytest.raises(ValueError, match="expects"):
        SiglipVisionTower(vc)(torch.zeros(1, 3, vc.image_size, vc.image_size - 16))


def test_connector_gelu_variants_differ_and_grey_becomes_three_channels():
    torch.manual_seed(0)
    exact = Connector(8, 16, "gelu")
    tanh = copy.deepcopy(exact)
    tanh.approximate = "tanh"
    x = torch.randn(4, 8)
    assert 0 < (exact(x) - tanh(x)).abs().max() < 1e-2
    vc = load_model_config("unix").vision
    px = normalize_pixels(torch.ones(1, 1, 4, 4), vc)
    assert px.shape == (1, 3, 4, 4)
    assert abs(float(px[0, 0, 0, 0]) - (1 - 0.555895) / 0.336385) < 1e-5  # white -> 1.3203 (reference appendix A)
