"""The kl-f16 VAE: structure, strict LDM -> diffusers conversion, the latent codec, latent tokens.

The LDM side is written here independently of `unix.weights.ldm_vae`: key names and shapes follow
the latent-diffusion `Encoder`/`Decoder` constructors, and a functional LDM forward pass (below)
checks that the converted diffusers model computes the same thing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from unix.config import ConfigError, VAEConfig, load_model_config
from unix.errors import UserError
from unix.models.vae import (
    RELEASED_LATENT_SCALE,
    RELEASED_LATENT_SHIFT,
    LatentCodec,
    build_vae,
    patchify,
    unpatchify,
)
from unix.weights.ldm_vae import convert_ldm_vae_state_dict, load_ldm_vae, save_vae_safetensors

FULL = VAEConfig()
TINY = load_model_config("tiny").vae


# ----------------------------------------------------------------------------------------------
# An independent description of the LDM checkpoint layout
# ----------------------------------------------------------------------------------------------


def ldm_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """LDM AutoencoderKL key -> shape, following ldm/modules/diffusionmodules/model.py.

    Attention only at the lowest resolution (attn_resolutions=[16] at resolution 256).
    """
    chs, n, nrb, z = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels
    out: dict[str, tuple[int, ...]] = {}

    def conv(p, cout, cin, k):
        out[f"{p}.weight"], out[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def norm(p, c):
        out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)

    def resnet(p, cin, cout):
        norm(f"{p}.norm1", cin), conv(f"{p}.conv1", cout, cin, 3), norm(f"{p}.norm2", cout), conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{name}", c, c, 1)

    conv("encoder.conv_in", chs[0], cfg.in_channels, 3)
    c = chs[0]
    for i in range(n):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", c, chs[i])
            c = chs[i]
            if i == n - 1:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", chs[-1], chs[-1]), attn(f"{part}.mid.attn_1", chs[-1])
        resnet(f"{part}.mid.block_2", chs[-1], chs[-1])
    norm("encoder.norm_out", c), conv("encoder.conv_out", 2 * z, c, 3)  # double_z: mean || logvar
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", chs[-1], z, 3)
    c = chs[-1]
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, chs[i])
            c = chs[i]
            if i == n - 1:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", cfg.in_channels, c, 3)
    return out


def random_ldm(cfg: VAEConfig, device="cpu", seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in ldm_shapes(cfg).items():
        if device == "meta":
            sd[k] = torch.empty(shape, device="meta")
        elif ".norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # small weights keep activations O(1) through the residual stack
            fan_in = max(1, torch.Size(shape[1:]).numel())
            sd[k] = torch.randn(shape, generator=g) / fan_in**0.5
    return sd


LOWEST_ATTN = ("encoder.down_blocks.4.attentions.", "decoder.up_blocks.0.attentions.")


# ----------------------------------------------------------------------------------------------
# Structure and conversion (full preset on the meta device: names and shapes only)
# ----------------------------------------------------------------------------------------------


def test_full_preset_is_kl_f16():
    with torch.device("meta"):
        vae = build_vae(FULL)
    assert sum(p.numel() for p in vae.parameters()) == 69_610_963  # 69.6M, as the LDM kl-f16 VAE
    assert len(vae.state_dict()) == len(ldm_shapes(FULL)) == 342
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


@pytest.mark.parametrize("cfg", [FULL, TINY], ids=["full", "tiny"])
def test_conversion_fills_every_parameter(cfg):
    ldm = random_ldm(cfg, device="meta")
    ldm["loss.discriminator.main.0.weight"] = torch.empty(64, 3, 4, 4, device="meta")  # ignored
    out = convert_ldm_vae_state_dict(ldm, cfg)
    with torch.device("meta"):
        target = build_vae(cfg).state_dict()
    assert set(out) == set(target)
    assert all(out[k].shape == target[k].shape for k in target)
    # The layers diffusers' own converter drops: 2 + 3 attention blocks x 10 tensors.
    lowest = [k for k in out if k.startswith(LOWEST_ATTN)]
    assert len(lowest) == 10 * (cfg.layers_per_block + cfg.layers_per_block + 1)


@pytest.mark.parametrize(
    "name", ["encoder.down.4.attn.1.q.weight", "decoder.up.4.attn.2.proj_out.bias", "decoder.up.1.upsample.conv.weight"]
)
def test_missing_tensor_is_named(name):
    ldm = random_ldm(FULL, device="meta")
    del ldm[name]
    with pytest.raises(UserError, match=f"1 missing: {name}"):
        convert_ldm_vae_state_dict(ldm, FULL)


@pytest.mark.parametrize("name", ["encoder.down.4.downsample.conv.weight", "decoder.up.0.attn.0.q.weight", "model.x"])
def test_unexpected_tensor_is_named(name):
    ldm = random_ldm(FULL, device="meta")
    ldm[name] = torch.empty(4, device="meta")
    with pytest.raises(UserError, match=f"unexpected: {name}"):
        convert_ldm_vae_state_dict(ldm, FULL)


def test_wrong_shape_is_named():
    ldm = random_ldm(FULL, device="meta")
    ldm["decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")  # 4 latent channels, not 16
    with pytest.raises(UserError, match=r"decoder\.conv_in\.weight \[512, 4, 3, 3\]"):
        convert_ldm_vae_state_dict(ldm, FULL)


# ----------------------------------------------------------------------------------------------
# Values (tiny preset, real tensors) against a functional LDM implementation
# ----------------------------------------------------------------------------------------------


def _gn(x, sd, p, g):
    return F.group_norm(x, g, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _resnet(x, sd, p, g):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1", g)), sd, f"{p}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2", g)), sd, f"{p}.conv2", padding=1)
    return (_conv(x, sd, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p, g):  # LDM AttnBlock: single head over all channels, 1x1-conv projections
    B, C, H, W = x.shape
    h = _gn(x, sd, f"{p}.norm", g)
    q, k, v = (_conv(h, sd, f"{p}.{n}").flatten(2) for n in "qkv")  # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k * C**-0.5, dim=-1)  # (B, HW_q, HW_k)
    return x + _conv((v @ w.transpose(1, 2)).view(B, C, H, W), sd, f"{p}.proj_out")


def _mid(h, sd, part, g):
    h = _resnet(h, sd, f"{part}.mid.block_1", g)
    return _resnet(_attn(h, sd, f"{part}.mid.attn_1", g), sd, f"{part}.mid.block_2", g)


def ldm_encode_mean(sd, x, cfg):
    n, g = len(cfg.block_out_channels), cfg.norm_num_groups
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(n):
        for j in range(cfg.layers_per_block):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}", g)
            h = _attn(h, sd, f"encoder.down.{i}.attn.{j}", g) if i == n - 1 else h
        if i != n - 1:  # LDM Downsample: asymmetric pad then stride-2 conv
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _mid(h, sd, "encoder", g)
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out", g)), sd, "encoder.conv_out", padding=1)
    return _conv(h, sd, "quant_conv").chunk(2, dim=1)[0]


def ldm_decode(sd, z, cfg):
    n, g = len(cfg.block_out_channels), cfg.norm_num_groups
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = _mid(h, sd, "decoder", g)
    for i in reversed(range(n)):
        for j in range(cfg.layers_per_block + 1):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}", g)
            h = _attn(h, sd, f"decoder.up.{i}.attn.{j}", g) if i == n - 1 else h
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out", g)), sd, "decoder.conv_out", padding=1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny LDM checkpoint written like a Lightning .ckpt, and its tensors."""
    ldm = random_ldm(TINY)
    path = tmp_path_factory.mktemp("vae") / "kl-f16-tiny.ckpt"
    extra = {"loss.logvar": torch.zeros(())}  # Lightning checkpoints carry the loss module too
    torch.save({"state_dict": {**ldm, **extra}, "global_step": 7, "epoch": 1}, path)
    return path, ldm


def test_values_are_copied(tiny_ckpt):
    path, ldm = tiny_ckpt
    vae = load_ldm_vae(path, TINY).vae
    sd = vae.state_dict()
    for dst, src in [
        ("encoder.down_blocks.4.attentions.0.to_q.weight", "encoder.down.4.attn.0.q.weight"),
        ("decoder.up_blocks.0.attentions.1.to_out.0.weight", "decoder.up.4.attn.1.proj_out.weight"),
    ]:
        assert torch.equal(sd[dst], ldm[src][:, :, 0, 0])
    # diffusers counts decoder levels in execution order, LDM from full resolution
    assert torch.equal(sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"], ldm["decoder.up.3.block.0.nin_shortcut.weight"])
    assert torch.equal(sd["decoder.up_blocks.3.upsamplers.0.conv.bias"], ldm["decoder.up.1.upsample.conv.bias"])


def test_codec_matches_ldm_forward(tiny_ckpt):
    path, ldm = tiny_ckpt
    codec = load_ldm_vae(path, TINY)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z_norm = codec.encode(x)
    torch.testing.assert_close(z_norm, codec.normalize(ldm_encode_mean(ldm, x, TINY)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codec.decode(z_norm), ldm_decode(ldm, codec.denormalize(z_norm), TINY), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# LatentCodec
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("px", [256, 512])
def test_full_preset_shapes_on_meta(px):
    with torch.device("meta"):
        codec = LatentCodec(build_vae(FULL), FULL)
    z = codec.encode(torch.empty(1, 3, px, px, device="meta"))
    assert z.shape == (1, 16, px // 16, px // 16)
    assert codec.decode(z).shape == (1, 3, px, px)


def test_tiny_shapes_sampling_and_frozen(tiny_ckpt):
    codec = load_ldm_vae(tiny_ckpt[0], TINY)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 16) and codec.decode(z).shape == (2, 3, 256, 256)
    s1 = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    s2 = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, z)
    codec.train()  # a parent's .train() must not unfreeze the VAE
    assert not codec.vae.training and not any(p.requires_grad for p in codec.parameters())


def test_bad_inputs_are_user_errors():
    with torch.device("meta"):
        codec = LatentCodec(build_vae(FULL), FULL)
    with pytest.raises(UserError, match="multiple of the VAE downsampling factor 16"):
        codec.encode(torch.empty(1, 3, 256, 250, device="meta"))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.empty(1, 1, 256, 256, device="meta"))
    with pytest.raises(UserError, match=r"\(B, 16, h, w\)"):
        codec.decode(torch.empty(1, 4, 16, 16, device="meta"))


def test_latent_normalisation_round_trip():
    codec = LatentCodec(build_vae(TINY), TINY)
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(codec.normalize(z), RELEASED_LATENT_SCALE * (z - RELEASED_LATENT_SHIFT))
    torch.testing.assert_close(codec.denormalize(codec.normalize(z)), z)
    torch.testing.assert_close(codec.normalize(codec.denormalize(z)), z)
    # The config defaults and the released preset carry the released constants.
    for cfg in (VAEConfig(), load_model_config("unix").vae):
        assert (cfg.scale, cfg.shift) == (RELEASED_LATENT_SCALE, RELEASED_LATENT_SHIFT)


def test_per_channel_standardisation_round_trip_and_checks():
    cfg = load_model_config("tiny", ["vae.channel_scale=[2.0,0.5,1.0,4.0]", "vae.channel_shift=[0.1,-0.2,0.0,0.3]"]).vae
    codec = LatentCodec(build_vae(cfg), cfg)
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    scaled = RELEASED_LATENT_SCALE * (z - RELEASED_LATENT_SHIFT)
    expected = torch.tensor([2.0, 0.5, 1.0, 4.0], dtype=torch.float64)[:, None, None] * (
        scaled - torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)[:, None, None])
    torch.testing.assert_close(codec.normalize(z), expected)
    torch.testing.assert_close(codec.denormalize(codec.normalize(z)), z)
    with pytest.raises(ConfigError, match="vae.channel_scale has 3 values; vae.latent_channels is 4"):
        load_model_config("tiny", ["vae.channel_scale=[1.0,1.0,1.0]", "vae.channel_shift=[0.0,0.0,0.0]"])
    with pytest.raises(ConfigError, match="give both or neither"):
        load_model_config("tiny", ["vae.channel_scale=[1.0,1.0,1.0,1.0]"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_model_config("tiny", ["vae.channel_scale=[1.0,0.0,1.0,1.0]", "vae.channel_shift=[0.0,0.0,0.0,0.0]"])


def test_patchify_matches_reference_einsum():
    z = torch.randn(2, 16, 3, 5)
    tokens = patchify(z)
    assert tokens.shape == (2, 15, 16)
    ref = torch.einsum("chpwq->hwpqc", z[1].reshape(16, 3, 1, 5, 1)).reshape(15, 16)
    assert torch.equal(tokens[1], ref)
    assert torch.equal(tokens[:, 1 * 5 + 4], z[:, :, 1, 4])  # token y*w + x
    assert torch.equal(unpatchify(tokens, 3, 5), z)
    with pytest.raises(ValueError):
        unpatchify(tokens, 4, 4)


def test_patchify_with_patch_two_groups_2x2_latents_like_the_reference():
    z = torch.randn(2, 4, 6, 8)
    tokens = patchify(z, 2)
    assert tokens.shape == (2, 3 * 4, 2 * 2 * 4)
    ref = torch.einsum("chpwq->hwpqc", z[0].reshape(4, 3, 2, 4, 2)).reshape(12, 16)
    assert torch.equal(tokens[0], ref)
    # token (y, x) = 1 * 4 + 2 holds latents rows 2-3, columns 4-5, its first values z[:, :, 2, 4]
    assert torch.equal(tokens[:, 1 * 4 + 2, :4], z[:, :, 2, 4])
    assert torch.equal(unpatchify(tokens, 6, 8, 2), z)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 4, 5, 8), 2)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="not-there.ckpt"):
        load_ldm_vae(tmp_path / "not-there.ckpt", TINY)


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "vae.json"
    path.write_text("{}")
    with pytest.raises(UserError, match="vae.json: not a VAE checkpoint"):
        load_ldm_vae(path, TINY)


class _Opaque:  # stands for arbitrary pickled objects (e.g. a Lightning callback)
    pass


def test_unsafe_pickle_asks_for_conversion(tmp_path):
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": random_ldm(TINY), "callback": _Opaque()}, path)
    with pytest.raises(UserError, match="convert it once"):
        load_ldm_vae(path, TINY)


def test_safetensors_round_trip(tiny_ckpt, tmp_path):
    codec = load_ldm_vae(tiny_ckpt[0], TINY)
    save_vae_safetensors(codec, tmp_path / "vae.safetensors")
    again = load_ldm_vae(tmp_path / "vae.safetensors", TINY)
    a, b = codec.vae.state_dict(), again.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
