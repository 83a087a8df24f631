"""Typed configs: presets load, overrides apply, unknown keys and bad choices fail with their name."""

import pytest

from unix.config import ConfigError, ModelConfig, load_config, load_model_config, preset_path


def test_presets_load():
    full = load_model_config("unix")
    assert (full.lm.num_layers, full.lm.hidden_size, full.vision.image_size, full.vae.latent_channels) == (24, 2048, 384, 16)
    assert full.vae.downsample == 16 and full.vision.num_patches == 576
    tiny = load_model_config("tiny")
    assert tiny.lm.hidden_size == 64 and tiny.tokens.bos == 1


def test_overrides_and_types():
    cfg = load_model_config("tiny", ["lm.num_layers=3", "vision.connector_act=gelu_tanh", "lm.rope_theta=500"])
    assert cfg.lm.num_layers == 3 and cfg.vision.connector_act == "gelu_tanh" and cfg.lm.rope_theta == 500.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("lm.num_layerz=3", "unknown key 'lm.num_layerz'"),
        ("attn_backend=xformers", "attn_backend"),
        ("lm.hidden_size=hello", "lm.hidden_size"),
        ("lm.head_dim=15", r"num_heads\*head_dim"),
        ("tokens.bos=5000", "tokens.bos"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config("tiny", [override])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("lm:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match="hidden"):
        load_config(ModelConfig, [path])
    with pytest.raises(ConfigError, match="not found"):
        load_config(ModelConfig, [tmp_path / "missing.yaml"])
    assert preset_path("model", "x.yaml").name == "x.yaml"


def test_an_empty_string_value_means_empty(tmp_path):
    from unix.train.config import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text("stage: gen\ninit: some/folder\n")
    cfg = load_train_config(path, ["init=", "repa.encoder="])  # OmegaConf reads `key=` as null
    assert cfg.init == "" and cfg.repa.encoder == ""
