"""Released-layout compatibility, strict loading, our save/load, Janus initialisation, CLI."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unix.cli import main
from unix.config import load_model_config
from unix.errors import UserError
from unix.models.sequence import Text, pack
from unix.models.unix import UniX
from unix.weights.folder import check_folder, load_model, save_model
from unix.weights.janus import load_janus
from unix.weights.released import released_layout, to_released

LAYOUT = Path(__file__).parent / "data" / "unix_released_layout.json"  # see its "_about"


def released_tensors() -> dict[str, list[int]]:
    """The release's tensor table, expanded from its compact form and checked against its digest."""
    data = json.loads(LAYOUT.read_text())
    table = dict(data["tensors"])
    for stack, block in data["repeated"].items():
        table.update({f"{stack}.{i}.{name}": shape for i in range(block["count"]) for name, shape in block["tensors"].items()})
    digest = hashlib.sha256(json.dumps(sorted(table.items()), separators=(",", ":")).encode()).hexdigest()
    assert digest == data["sha256"], "the expanded layout differs from the reference table it was made from"
    return table


def test_full_preset_matches_the_released_layout():
    ref = released_tensors()
    assert len(ref) == 996  # reference/unix-compat.md 1.1
    with torch.device("meta"):
        model = UniX(load_model_config("unix"))
    layout = released_layout(model)
    ours = layout["tensors"]
    extra = layout["extra"]
    only_ref = set(ref) - set(ours)
    # Everything the release has and we do not write is listed under "extra" (unused or recomputed).
    assert only_ref == set(extra), sorted(only_ref ^ set(extra))[:10]
    assert set(ours) <= set(ref)
    for name, shape in ours.items():
        assert ref[name] == shape, name
    for name, shape in extra.items():
        assert ref[name] == shape, name
    assert sum(torch.Size(s).numel() for s in ref.values()) == 3_216_835_600


def tiny_released_folder(tmp_path, drop=None, rename_vit=False):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = UniX(cfg)
    folder = save_model(model, tmp_path / "tiny")
    tensors = load_file(str(folder / "model.safetensors"))
    # What the release also carries: the unused pool head, the unused ViT table, the latent table.
    tensors["vit_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, cfg.vision.width)
    tensors["vit_pos_embed.pos_embed"] = torch.zeros(cfg.vision.num_patches, cfg.lm.hidden_size)
    tensors["latent_pos_embed.pos_embed"] = model.latent_pos_table.clone()
    if rename_vit:
        tensors = {k.replace("vit_model.", "vision_model.", 1): v for k, v in tensors.items()}
    if drop:
        del tensors[drop]
    save_file(tensors, str(folder / "model.safetensors"))
    return model, folder


def test_tiny_released_checkpoint_loads_and_runs(tmp_path):
    model, folder = tiny_released_folder(tmp_path, rename_vit=True)
    loaded, report = load_model(folder)
    assert report.ok and len(report.ignored) == 2 and report.fixed_checked == ["latent_pos_embed.pos_embed"]
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    cfg = model.cfg
    batch = pack([[Text([cfg.tokens.bos, 7, 8, cfg.tokens.eos])]], cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size)
    with torch.no_grad():
        ref = model.eval()(batch, logits_at=batch.kind == 0).logits
        got = loaded(batch, logits_at=batch.kind == 0).logits
    torch.testing.assert_close(got, ref)


def test_missing_tensor_fails_with_its_name(tmp_path):
    name = "language_model.model.layers.1.self_attn.k_proj_moe_gen.bias"
    _, folder = tiny_released_folder(tmp_path, drop=name)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_model(folder)
    _, report = load_model(folder, allow_partial=True)
    assert report.missing == [name]


def test_wrong_fixed_table_is_reported(tmp_path):
    _, folder = tiny_released_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["latent_pos_embed.pos_embed"] = torch.randn_like(tensors["latent_pos_embed.pos_embed"])
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="latent_pos_embed"):
        load_model(folder)


def test_check_command(tmp_path, capsys):
    _, folder = tiny_released_folder(tmp_path)
    assert main(["weights", "check", str(folder)]) == 0
    assert "loadable" in capsys.readouterr().out
    _, bad = tiny_released_folder(tmp_path / "b", drop="lm_head.weight".join(["language_model.", ""]))
    assert main(["weights", "check", str(bad)]) == 2
    out = capsys.readouterr()
    assert "missing: language_model.lm_head.weight" in out.out and "not loadable" in out.err
    assert check_folder(tmp_path / "nope").problems


def test_layout_command(capsys):
    assert main(["weights", "layout", "--preset", "tiny"]) == 0
    layout = json.loads(capsys.readouterr().out)
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight" in layout["tensors"]
    assert "vit_model.vision_tower.attn_pool.latent" in layout["extra"]


def test_janus_initialisation(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    source = UniX(cfg)
    janus = {}
    for name, t in to_released(source.state_dict()).items():
        if "_moe_gen" in name or name.startswith(("time_embedder", "vae2llm", "llm2vae")):
            continue
        if name.endswith(("_proj.bias", "_norm.weight")) and "self_attn" in name:
            continue  # Janus has no q/k/v biases and no QK-norm
        name = name.replace("vit_model.", "vision_model.").replace("connector.layers", "aligner.layers")
        janus[name] = t
    janus["gen_head.output_mlp_projector.weight"] = torch.zeros(3)  # discarded VQ path
    (tmp_path / "janus").mkdir()
    save_file(janus, str(tmp_path / "janus" / "model.safetensors"))
    model = UniX(cfg)
    load_janus(model, tmp_path / "janus")
    layer = model.decoder.layers[0]
    assert torch.equal(layer.und.q_proj.weight, source.decoder.layers[0].und.q_proj.weight)
    assert torch.equal(layer.gen.mlp.up_proj.weight, layer.und.mlp.up_proj.weight)
    assert not layer.und.k_proj.bias.any() and torch.all(layer.gen.q_norm.weight == 1)
    assert not model.llm2vae.weight.any()
    del janus["language_model.lm_head.weight"]
    save_file(janus, str(tmp_path / "janus" / "model.safetensors"))
    with pytest.raises(UserError, match="lm_head"):
        load_janus(UniX(cfg), tmp_path / "janus")


def test_convert_command(tmp_path):
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3)}, "epoch": 3}, tmp_path / "x.ckpt")
    out = tmp_path / "x.safetensors"
    assert main(["weights", "convert", str(tmp_path / "x.ckpt"), str(out)]) == 0
    assert torch.equal(load_file(str(out))["a.weight"], torch.ones(2, 3))
    assert main(["weights", "convert", str(tmp_path / "x.ckpt"), str(out)]) == 2  # no silent overwrite
