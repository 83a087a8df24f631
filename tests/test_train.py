"""The staged trainer on the tiny preset and a small phantom set (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unix.cli import main
from unix.errors import UserError
from unix.train.config import load_train_config
from unix.train.trainer import Trainer, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    assert main(["data", "phantom", "--out", str(root / "data"), "--n", "120", "--seed", "0", "--size", "64"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    from unix.config import load_model_config
    from unix.models.vae import LatentCodec, build_vae
    from unix.weights.ldm_vae import save_vae_safetensors

    cfg = load_model_config("tiny").vae
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "model.safetensors"
    save_vae_safetensors(LatentCodec(build_vae(cfg), cfg), path)
    return path


def cfg_for(stage, out, data, *extra):
    name = "phantom_stage1.yaml" if stage == "und" else "phantom_stage2.yaml"
    base = [f"data.shards={data}", f"out={out}", "steps=4", "save_every=2", "optim.warmup_steps=1",
            "data.token_budget=700", "log_every=1"]
    if stage == "gen":
        base += ["data.image_size=64", "init=''", "vae=''", "model=tiny"]
    return load_train_config(CONFIGS / name, base + list(extra))


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "run"
    history = run(cfg_for("und", out, data))
    return out, history


def test_und_stage_runs_and_exports(stage1, tmp_path):
    out, history = stage1
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all(h["loss"] > 0 for h in history)
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_last
    assert json.loads((out / "final" / "train.json").read_text())["stages"] == ["und"]
    from unix.infer import ReportSettings, load_pipeline

    pipe = load_pipeline(out / "final", device="cpu")
    from PIL import Image

    Image.new("L", (64, 64), 128).save(tmp_path / "x.png")
    assert isinstance(pipe.reports([str(tmp_path / "x.png")], ReportSettings(max_new_tokens=3))[0], str)


def test_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    full = run(cfg_for("und", tmp_path / "a", data))
    first = run(cfg_for("und", tmp_path / "b", data, "steps=2"))
    rest = run(cfg_for("und", tmp_path / "b", data))  # resumes from step 2
    assert [h["step"] for h in rest] == [3, 4]
    assert [round(h["loss"], 6) for h in first + rest] == [round(h["loss"], 6) for h in full]


def test_gen_stage_freezes_und_bitwise(stage1, data, vae_file, tmp_path):
    init = stage1[0] / "final"
    cfg = cfg_for("gen", tmp_path / "g", data, f"init={init}", f"vae={vae_file}", "gen_init_from=''")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # Stage 1 trained no generation branch: gen starts as a copy of und.
    layer = trainer.model.decoder.layers[0]
    assert torch.equal(layer.gen.q_proj.weight, layer.und.q_proj.weight)
    history = trainer.fit()
    params = dict(trainer.model.named_parameters())
    und = [n for n in before if trainer.model.branch_of(n) == "und"]
    assert und and all(torch.equal(before[n], params[n]) for n in und)
    assert any(not torch.equal(before[n], params[n]) for n in before if trainer.model.branch_of(n) == "gen")
    assert all(not p.requires_grad or trainer.model.branch_of(n) == "gen" for n, p in params.items())
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(params[n]) not in opt_params for n in und)  # frozen: no optimizer state
    assert len(history) == 4
    assert json.loads((tmp_path / "g" / "final" / "train.json").read_text())["stages"] == ["und", "gen"]
    assert (tmp_path / "g" / "final" / "vae" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["und", "gen"])
def test_activation_checkpointing_gives_the_same_steps(stage, stage1, data, vae_file, tmp_path, monkeypatch):
    extra = [f"init={stage1[0] / 'final'}", f"vae={vae_file}", "gen_init_from=''"] if stage == "gen" else []
    plain = run(cfg_for(stage, tmp_path / "plain", data, "steps=3", *extra))
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    saved = run(cfg_for(stage, tmp_path / "ckpt", data, "steps=3", "activation_checkpointing=true", *extra))
    assert len(calls) == 3 * 2  # every layer of the tiny preset's 2, every step
    assert [h["loss"] for h in saved] == pytest.approx([h["loss"] for h in plain], rel=1e-5)
    assert [h["grad_norm"] for h in saved] == pytest.approx([h["grad_norm"] for h in plain], rel=1e-4)


def test_init_takes_only_the_new_vaes_latent_normalisation(stage1, data, vae_file, tmp_path):
    init = stage1[0] / "final"
    cfg = cfg_for("gen", tmp_path / "n", data, f"init={init}", f"vae={vae_file}", "steps=1",
                  "model_overrides=[vae.scale=2.5,vae.shift=-0.125]")
    run(cfg)
    exported = json.loads((tmp_path / "n" / "final" / "config.json").read_text())["unix_model"]["vae"]
    assert (exported["scale"], exported["shift"]) == (2.5, -0.125)
    with pytest.raises(UserError, match="lm.num_layers"):
        Trainer(cfg_for("gen", tmp_path / "m", data, f"init={init}", f"vae={vae_file}", "model_overrides=[lm.num_layers=3]"))


def test_latent_patch_size_rebuilds_the_untrained_gen_heads(stage1, data, vae_file, tmp_path):
    init = stage1[0] / "final"
    cfg = cfg_for("gen", tmp_path / "p", data, f"init={init}", f"vae={vae_file}",
                  "model_overrides=[gen.latent_patch_size=2,gen.max_latent_size=2,gen.latent_rope=2d]")
    trainer = Trainer(cfg)
    C = trainer.model.cfg.vae.latent_channels
    assert trainer.model.vae2llm.in_features == 4 * C and trainer.model.llm2vae.out_features == 4 * C
    assert trainer.model.latent_pos_table.shape[0] == 2 * 2  # 64 px = 2x2 tokens, the largest the table holds
    assert {id(trainer.model.vae2llm.weight), id(trainer.model.llm2vae.weight)} <= {id(p) for _, p in trainer.trained}
    history = trainer.fit()
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    from unix.infer import load_pipeline

    pipe = load_pipeline(tmp_path / "p" / "final", device="cpu")
    assert (pipe.cfg.gen.latent_patch_size, pipe.cfg.gen.max_latent_size, pipe.cfg.gen.latent_rope) == (2, 2, "2d")
    assert pipe.images(["Small effusion."], [0], pipe.image_settings(size=64, steps=3))[0].shape == (64, 64)
    # a trained gen branch keeps its latent layout (patch size, table, RoPE); an image size off the token grid is refused
    for key in ("gen.latent_patch_size=1", "gen.max_latent_size=4", "gen.latent_rope=shared"):
        with pytest.raises(UserError, match=key.partition("=")[0]):
            Trainer(cfg_for("gen", tmp_path / "q", data, f"init={tmp_path / 'p' / 'final'}", f"vae={vae_file}",
                            f"model_overrides=[{key}]"))
    with pytest.raises(UserError, match="multiple of 32"):
        Trainer(cfg_for("gen", tmp_path / "r", data, f"init={init}", f"vae={vae_file}", "data.image_size=48",
                        "model_overrides=[gen.latent_patch_size=2]"))
    with pytest.raises(UserError, match="latent table"):
        Trainer(cfg_for("gen", tmp_path / "r", data, f"init={init}", f"vae={vae_file}", "data.image_size=128",
                        "model_overrides=[gen.latent_patch_size=2,gen.max_latent_size=2]"))


def test_loss_falls_on_a_short_run(data, tmp_path):
    history = run(cfg_for("und", tmp_path / "f", data, "steps=30", "save_every=30", "optim.lr=3e-3"))
    first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_bad_config_fails_before_compute(data, vae_file, tmp_path):
    with pytest.raises(UserError, match="data.shards"):
        Trainer(cfg_for("und", tmp_path / "x", tmp_path / "missing"))
    with pytest.raises(UserError, match="image_size"):
        cfg_for("gen", tmp_path / "x", data, "data.image_size=70")
    with pytest.raises(UserError, match="stage"):
        cfg_for("und", tmp_path / "x", data, "stage=pretrain")
    with pytest.raises(UserError, match="vae"):
        Trainer(cfg_for("gen", tmp_path / "x", data))
    with pytest.raises(UserError, match="holds no 'trian-"):
        Trainer(cfg_for("und", tmp_path / "x", data, "data.split=trian"))
    with pytest.raises(UserError, match="logger=wandb needs the wandb package"):
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
        Trainer(cfg_for("und", tmp_path / "x", data, "logger=wandb"))
    run(cfg_for("und", tmp_path / "y", data, "steps=1"))
    with pytest.raises(UserError, match="stage 'und' / model 'tiny', not stage 'gen'"):
        Trainer(cfg_for("gen", tmp_path / "y", data, f"vae={vae_file}"))
    # a run that stopped before its first checkpoint leaves nothing to resume: its out= is free
    import shutil

    shutil.rmtree(tmp_path / "y" / "checkpoints")
    Trainer(cfg_for("gen", tmp_path / "y", data, f"vae={vae_file}"))


def test_checkpoints_export_to_weights_folders_and_keep_the_tokenizer(stage1, data, vae_file, tmp_path, monkeypatch, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from unix.infer import ReportSettings, load_pipeline

    out = stage1[0]
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert not (ckpt / "model.safetensors").exists()  # DCP shards, not a weights folder
    Image.new("L", (64, 64), 128).save(tmp_path / "x.png")
    assert main(["train-export", str(ckpt), "--out", str(tmp_path / "mid")]) == 0
    assert isinstance(load_pipeline(tmp_path / "mid", device="cpu").reports([str(tmp_path / "x.png")], ReportSettings(max_new_tokens=3))[0], str)
    # the last checkpoint holds the weights the run exported (stage 1 keeps no EMA)
    final, mid = load_file(str(out / "final" / "model.safetensors")), load_file(str(tmp_path / "mid" / "model.safetensors"))
    assert final.keys() == mid.keys() and all(torch.equal(final[k], mid[k]) for k in final)
    assert main(["train-export", str(ckpt), "--out", str(tmp_path / "mid")]) == 2  # never over a folder
    assert main(["train-export", str(ckpt), "--out", str(tmp_path / "e"), "--ema"]) == 2  # no EMA kept
    gen = run(cfg_for("gen", tmp_path / "g", data, f"init={out / 'final'}", f"vae={vae_file}", "steps=2", "optim.ema_decay=0.9"))
    assert gen
    assert main(["train-export", str(tmp_path / "g" / "checkpoints" / "step-0000002"), "--out", str(tmp_path / "gmid"), "--ema"]) == 0
    pipe = load_pipeline(tmp_path / "gmid", device="cpu")
    assert pipe.images(["No finding."], [0], pipe.image_settings(size=64, steps=2))[0].shape == (64, 64)
    ema, exported = load_file(str(tmp_path / "gmid" / "model.safetensors")), load_file(str(tmp_path / "g" / "final" / "model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in ema)  # the export at the end is the EMA too
    # resuming a from-scratch stage 1 reads its tokenizer back instead of training one again
    import unix.train.trainer as trainer_mod

    import shutil

    resumed = shutil.copytree(out, tmp_path / "s1")  # the module's stage-1 run stays as it is
    monkeypatch.setattr(trainer_mod, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained again"))
    assert [h["step"] for h in run(cfg_for("und", resumed, data, "steps=5"))] == [5]
    assert (resumed / "final" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    args = [f"data.shards={data}", f"out={resumed}", "steps=5", "data.token_budget=700"]
    assert main(["train", str(CONFIGS / "phantom_stage1.yaml"), *args]) == 0
    assert "already trained to step 5" in capsys.readouterr().out


def test_torchrun_two_processes(data, vae_file, tmp_path):
    """Both stages under torchrun with 2 gloo processes (FSDP2), then a resume; stage 1 also with
    replicated models (`parallel=replicate`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    weights = Path(__file__).resolve().parents[1] / "weights"
    repa = ["repa.encoder=phantom", "repa.layer=0", f"repa.weights_dir={weights}"]  # head grads all-reduced
    for stage, extra in (("und", []), ("gen", [f"vae={vae_file}", *repa])):
        cfg = CONFIGS / ("phantom_stage1.yaml" if stage == "und" else "phantom_stage2.yaml")
        args = [f"data.shards={data}", f"out={tmp_path / stage}", "steps=3", "save_every=2", "data.token_budget=700"]
        if stage == "gen":
            args += ["init=''", "model=tiny", "data.image_size=64"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "unix.train", str(cfg)]
        res = subprocess.run(cmd + args + extra, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and (tmp_path / stage / "final" / "model.safetensors").is_file()
        if stage == "und":  # resume the sharded run from its step-3 checkpoint
            res = subprocess.run(cmd + args + ["steps=4"], capture_output=True, text=True, env=env, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
            steps = [json.loads(x)["step"] for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
            assert steps == [1, 2, 3, 4]
            # each rank wrote its own shards; one process resumes them: the weights the two exported
            step4 = tmp_path / stage / "checkpoints" / "step-0000004"
            assert {p.name for p in step4.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
            from safetensors.torch import load_file

            from unix.weights.released import to_released

            import shutil

            shutil.copytree(tmp_path / stage, tmp_path / "one")
            one = Trainer(load_train_config(cfg, args + [f"out={tmp_path / 'one'}", "steps=5"]))
            exported = load_file(str(tmp_path / stage / "final" / "model.safetensors"))
            assert all(torch.equal(exported[k], v) for k, v in to_released(one.model.state_dict()).items())
            assert [h["step"] for h in one.fit()] == [5]
            # replicas with one gradient all-reduce a step, stopped at 3 and resumed: the FSDP run's losses
            rep = [a.replace(f"out={tmp_path / stage}", f"out={tmp_path / 'rep'}") for a in args] + ["parallel=replicate"]
            for steps_arg in ("steps=3", "steps=4"):
                res = subprocess.run(cmd + rep + [steps_arg], capture_output=True, text=True, env=env, timeout=600)
                assert res.returncode == 0, res.stderr[-3000:]
            losses = {name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                      for name in (stage, "rep")}
            assert len(losses["rep"]) == 4 and losses["rep"] == pytest.approx(losses[stage], rel=1e-4)


def test_vae_stage0_writes_a_loadable_vae(data, tmp_path):
    from unix.config import load_model_config
    from unix.weights.ldm_vae import load_ldm_vae

    out = tmp_path / "vae"
    assert main(["train-vae", "--shards", str(data), "--out", str(out), "--steps", "3", "--image-size", "64", "--batch-size", "2"]) == 0
    stats = json.loads((out / "vae.json").read_text())
    assert stats["scale"] > 0
    assert len(stats["channel_scale"]) == len(stats["channel_shift"]) == 4 and min(stats["channel_scale"]) > 0
    codec = load_ldm_vae(out / "model.safetensors", load_model_config("tiny").vae)
    assert codec.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 4, 4)
    assert main(["train-vae", "--shards", str(data), "--out", str(out), "--image-size", "70"]) == 2
    assert main(["train-vae", "--shards", str(data), "--out", str(out), "--image-size", "64", "--crop", "80"]) == 2


def test_vae_decoder_fine_tune_keeps_the_encoder_and_its_statistics(data, tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "vae", tmp_path / "vae_dec"
    common = ["--shards", str(data), "--image-size", "64", "--batch-size", "2"]
    assert main(["train-vae", "--out", str(first), "--steps", "2", *common]) == 0
    assert main(["train-vae", "--out", str(second), "--steps", "2", "--lr", "1e-2", "--init", str(first), "--decoder-only",
                 "--latent-noise", "2", *common]) == 0
    before, after = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    stats, init_stats = json.loads((second / "vae.json").read_text()), json.loads((first / "vae.json").read_text())
    assert (stats["scale"], stats["shift"], stats["latent_noise"]) == (init_stats["scale"], init_stats["shift"], 2.0)
    # misuse is refused before any training, naming the flag
    assert main(["train-vae", "--out", str(tmp_path / "x"), "--decoder-only", *common]) == 2
    assert main(["train-vae", "--out", str(tmp_path / "x"), "--latent-noise", "1", *common]) == 2
    assert main(["train-vae", "--out", str(first), "--init", str(first), "--decoder-only", *common]) == 2
    assert main(["train-vae", "--out", str(tmp_path / "x"), "--init", str(tmp_path), "--decoder-only", *common]) == 2
    assert not (tmp_path / "x").exists()


def test_vae_trains_on_crops(monkeypatch, data, tmp_path):
    """--crop feeds the autoencoder windows of the images; the latent statistics still see whole images."""
    from diffusers import AutoencoderKL

    seen = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (seen.append(tuple(x.shape[-2:])), encode(self, x, *a, **k))[1])
    out = tmp_path / "vae"
    assert main(["train-vae", "--shards", str(data), "--out", str(out), "--steps", "2", "--image-size", "64",
                 "--batch-size", "2", "--crop", "32"]) == 0
    assert seen[:2] == [(32, 32), (32, 32)] and set(seen[2:]) == {(64, 64)}


def test_vae_edge_loss_sees_thin_lines_that_plain_l1_barely_weighs(monkeypatch, data, tmp_path):
    """--edge-weight adds an L1 on neighbour differences: a one-pixel line lost costs it twice the
    line's L1, a smooth ramp's offset costs it nothing; train-vae passes the weight through."""
    import unix.train.vae as vae_mod

    img = torch.zeros(1, 1, 32, 32)
    line = img.clone()
    line[..., 16] = 1.0
    assert vae_mod.edge_l1(img, img) == 0
    assert vae_mod.edge_l1(img, line).item() == pytest.approx(0.5 * 2 * 32 / (32 * 31), rel=1e-6)
    ramp = torch.linspace(0, 1, 32).expand(1, 1, 32, 32)
    assert vae_mod.edge_l1(ramp, ramp + 0.3).item() == pytest.approx(0.0, abs=1e-6)
    calls = []
    edge = vae_mod.edge_l1
    monkeypatch.setattr(vae_mod, "edge_l1", lambda rec, x: (calls.append(rec.shape), edge(rec, x))[1])
    args = ["train-vae", "--shards", str(data), "--out", str(tmp_path / "vae"), "--steps", "2", "--image-size", "32", "--batch-size", "2"]
    assert main(args) == 0 and calls == []
    assert main(args + ["--edge-weight", "1"]) == 0 and len(calls) == 2
    assert main(args + ["--edge-weight", "-1"]) == 2


def test_vision_stage0_starts_stage1(data, tmp_path):
    from safetensors.torch import load_file

    from unix.weights.folder import load_model

    out = tmp_path / "vision"
    assert main(["train-vision", "--shards", str(data), "--out", str(out), "--preset", "tiny", "--steps", "3", "--batch-size", "4"]) == 0
    stats = json.loads((out / "vision.json").read_text())
    assert stats["preset"] == "tiny" and 0 <= (stats["val_micro_f1"] or 0) <= 1
    tower = load_file(str(out / "vision.safetensors"))
    assert "patch_embed.proj.weight" in tower and "blocks.1.mlp.fc2.bias" in tower
    # stage 1 starts from the tower: with lr 0 its exported weights are the pre-trained ones
    run(cfg_for("und", tmp_path / "s1", data, f"vision={out / 'vision.safetensors'}", "steps=1", "optim.lr=0"))
    model, _ = load_model(tmp_path / "s1" / "final")
    for name, value in tower.items():
        assert torch.equal(model.vision.state_dict()[name], value), name
    # a tower of another size is refused by name before any training
    with pytest.raises(UserError, match="does not fit"):
        run(cfg_for("und", tmp_path / "s1b", data, f"vision={out / 'vision.safetensors'}", "model_overrides=[vision.width=64]"))
    with pytest.raises(UserError, match="vision: file"):
        run(cfg_for("und", tmp_path / "s1c", data, "vision=nope.safetensors"))


def test_repa_aligns_and_resumes(data, vae_file, tmp_path):
    from unix.config import ConfigError
    from unix.infer import load_pipeline

    weights = Path(__file__).resolve().parents[1] / "weights"
    extra = [f"vae={vae_file}", "repa.encoder=phantom", "repa.layer=0", f"repa.weights_dir={weights}"]
    full = run(cfg_for("gen", tmp_path / "a", data, *extra))
    assert all(0 < h["repa"] < 2 for h in full)
    first = run(cfg_for("gen", tmp_path / "b", data, *extra, "steps=2"))
    rest = run(cfg_for("gen", tmp_path / "b", data, *extra))  # resumes the head and its optimizer too
    assert [(round(h["loss"], 6), round(h["repa"], 6)) for h in first + rest] == [(round(h["loss"], 6), round(h["repa"], 6)) for h in full]
    load_pipeline(tmp_path / "a" / "final", device="cpu")  # the head is not exported
    # the alignment is learned: the REPA loss falls over a short run
    history = run(cfg_for("gen", tmp_path / "c", data, *extra, "steps=25", "save_every=25", "optim.lr=3e-3"))
    assert sum(h["repa"] for h in history[-3:]) < 0.8 * sum(h["repa"] for h in history[:3])
    # the model's own tower as the encoder: no other weights needed
    tower = run(cfg_for("gen", tmp_path / "v", data, f"vae={vae_file}", "repa.encoder=vision", "repa.layer=0"))
    assert all(0 < h["repa"] < 2 for h in tower)
    with pytest.raises(ConfigError, match="repa"):
        cfg_for("und", tmp_path / "x", data, "repa.encoder=phantom")
    with pytest.raises(UserError, match="repa.encoder"):
        Trainer(cfg_for("gen", tmp_path / "y", data, f"vae={vae_file}", "repa.encoder=clip"))


def test_repa_vision_tower_is_a_frozen_copy_of_the_models():
    from unix.config import load_model_config
    from unix.models.unix import UniX
    from unix.models.vision import normalize_pixels
    from unix.train.repa import build_encoder, target_tokens

    torch.manual_seed(0)
    model = UniX(load_model_config("tiny"))
    vc = model.cfg.vision
    encoder = build_encoder("vision", "", model)
    side = vc.image_size // vc.patch_size
    images = torch.rand(2, 1, vc.image_size, vc.image_size)
    fmap = encoder(images)
    assert fmap.shape == (2, vc.width, side, side) and encoder.dim == vc.width
    with torch.no_grad():
        tokens = model.vision(normalize_pixels(images, vc))
    torch.testing.assert_close(fmap[1, :, 1, 0], tokens[1, side])  # raster order: row 1, column 0
    # gen-stage images (another size) are area-resized to the tower's input
    big = images.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    torch.testing.assert_close(encoder(big), fmap)
    assert target_tokens(encoder, big, 2, 2).shape == (8, vc.width)
    # a copy: training the model (its tower frozen in gen stages anyway) cannot move the targets
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        model.vision.patch_embed.proj.weight.add_(1.0)
    torch.testing.assert_close(encoder(images), fmap)


def test_ema_warms_up_and_then_uses_its_decay():
    from unix.train.optim import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([("w", p)], 0)  # first update: decay 1/10, the average moves 90% of the way
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.9))
    for k in range(1, 1000):
        ema.update([("w", p)], k)
    # without the warm-up 0.999 ** 1000 = 37% of the start (0) would remain
    assert ema.shadow["w"].min() > 0.99
    assert ema.decay_at(10_000_000) == 0.999


def test_vision_stage_decodes_each_image_once(data):
    from unix.data.shards import iter_rows
    from unix.train.vision import DecodedImages

    rows = list(iter_rows(str(data), "train"))[:3]
    decode = DecodedImages(32, max_bytes=2 * 32 * 32)  # room for two images
    first = [decode(r) for r in rows]
    assert len(decode.images) == 2
    again = [decode(r) for r in rows]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # cached or not: the same pixels
    assert first[0].shape == (1, 32, 32) and 0.0 <= float(first[0].min()) and float(first[0].max()) <= 1.0


def test_vision_probe_max_pooling_sees_a_single_patch(data, tmp_path):
    from unix.config import load_model_config
    from unix.eval.chexpert import CHEXPERT_FINDINGS
    from unix.train.vision import Probe

    cfg = load_model_config("tiny").vision
    torch.manual_seed(0)
    probe = Probe(cfg, "meanmax").eval()
    assert probe.head.in_features == 2 * cfg.width
    probe.tower.forward = lambda x: x  # feed patch features straight to the pooling
    one = torch.zeros(1, cfg.num_patches, cfg.width)
    one[0, 3] = 5.0  # one strong patch ...
    spread = torch.full_like(one, 5.0 / cfg.num_patches)  # ... or the same mean spread over all
    mean_probe = Probe(cfg, "mean").eval()
    mean_probe.tower.forward = lambda x: x
    with torch.no_grad():
        assert not torch.allclose(probe(one), probe(spread))
        assert torch.allclose(mean_probe(one), mean_probe(spread), atol=1e-6)  # the average alone cannot tell
    with pytest.raises(UserError, match="pool"):
        Probe(cfg, "max")
    out = tmp_path / "v"
    assert main(["train-vision", "--shards", str(data), "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--pool", "meanmax"]) == 0
    stats = json.loads((out / "vision.json").read_text())
    assert stats["pool"] == "meanmax" and set(stats["val_f1"]) == set(CHEXPERT_FINDINGS)


def test_gen_latent_cache_matches_fresh_encoding_and_fills_once(data, vae_file, tmp_path):
    """96 training rows: 8 steps of ~10 samples pass the epoch; the second epoch reads the cache."""
    extra = (f"vae={vae_file}", "steps=12", "save_every=12", "data.token_budget=800")
    cached = Trainer(cfg_for("gen", tmp_path / "c", data, *extra))
    encodes = []
    encode = cached._encode
    cached._encode = lambda gray: encodes.append(len(gray)) or encode(gray)
    with_cache = cached.fit()
    fresh = run(cfg_for("gen", tmp_path / "f", data, *extra, "data.latent_cache_gb=0"))
    n_rows = sum(cached.stream.counts)
    assert len(cached.latents.items) == n_rows and sum(encodes) == n_rows and set(encodes) == {1}
    assert cached.stream.epoch >= 1  # the run passed its data, so later rows came from the cache
    for a, b in zip(with_cache, fresh):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_gen_init_key_gain_scales_only_the_copied_gen_key_norms(stage1, data, vae_file, tmp_path):
    init = stage1[0] / "final"
    model = Trainer(cfg_for("gen", tmp_path / "k", data, f"init={init}", f"vae={vae_file}", "gen_init_key_gain=0.25",
                            "gen_init_from=''")).model
    for layer in model.decoder.layers:
        assert torch.allclose(layer.gen.k_norm.weight, 0.25 * layer.und.k_norm.weight)
        assert torch.equal(layer.gen.q_norm.weight, layer.und.q_norm.weight)
        assert torch.equal(layer.gen.k_proj.weight, layer.und.k_proj.weight)


def test_gen_init_out_gain_scales_only_the_gen_residual_outputs(stage1, data, vae_file, tmp_path):
    init = stage1[0] / "final"
    base = ("gen", tmp_path / "o", data, f"init={init}", f"vae={vae_file}", "gen_init_from=''")
    model = Trainer(cfg_for(*base, "gen_init_out_gain=0")).model
    for layer in model.decoder.layers:
        assert not layer.gen.o_proj.weight.any() and not layer.gen.mlp.down_proj.weight.any()
        assert layer.und.o_proj.weight.any() and torch.equal(layer.gen.mlp.up_proj.weight, layer.und.mlp.up_proj.weight)
    half = Trainer(cfg_for(*base[:1], tmp_path / "h", *base[2:], "gen_init_out_gain=0.5")).model
    layer = half.decoder.layers[0]
    assert torch.allclose(layer.gen.o_proj.weight, 0.5 * layer.und.o_proj.weight)
    from unix.config import ConfigError

    with pytest.raises(ConfigError, match="gen_init_out_gain"):
        cfg_for(*base[:1], tmp_path / "n", *base[2:], "gen_init_out_gain=-1")


def test_gen_init_from_takes_gen_from_another_und_or_keeps_it_random(stage1, data, vae_file, tmp_path):
    from unix.weights.folder import load_model, save_model

    init = stage1[0] / "final"
    stored, _ = load_model(init)
    other = tmp_path / "other"  # a second und of the same decoder, its weights all changed
    with torch.no_grad():
        for p in stored.parameters():
            p.add_(1.0)
    save_model(stored, other)
    args = (f"init={init}", f"vae={vae_file}")
    model = Trainer(cfg_for("gen", tmp_path / "a", data, *args, f"gen_init_from={other}")).model
    for layer, src in zip(model.decoder.layers, stored.decoder.layers):
        assert torch.equal(layer.gen.v_proj.weight, src.und.v_proj.weight)
        assert not torch.equal(layer.und.v_proj.weight, src.und.v_proj.weight)  # und stays the init's
    fresh, _ = load_model(init)
    model = Trainer(cfg_for("gen", tmp_path / "b", data, *args, "gen_init_from=random")).model
    for layer, src in zip(model.decoder.layers, fresh.decoder.layers):
        assert torch.equal(layer.gen.v_proj.weight, src.gen.v_proj.weight)
        assert not torch.equal(layer.gen.v_proj.weight, layer.und.v_proj.weight)
    with pytest.raises(UserError, match="gen_init_from"):
        Trainer(cfg_for("gen", tmp_path / "c", data, *args, f"gen_init_from={tmp_path / 'none'}"))


def test_vision_lr_scale_slows_or_freezes_only_the_tower(data, tmp_path):
    from unix.config import ConfigError

    def moved(trainer):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.fit()
        after = dict(trainer.model.named_parameters())
        return {n: float((after[n].detach() - before[n]).abs().max()) for n in before}

    full = moved(Trainer(cfg_for("und", tmp_path / "a", data, "steps=2", "optim.vision_lr_scale=1")))
    slow = moved(Trainer(cfg_for("und", tmp_path / "b", data, "steps=2", "optim.vision_lr_scale=0.01")))
    tower = [n for n in full if n.startswith("vision.")]
    assert tower and all(slow[n] < 0.1 * full[n] for n in tower if full[n] > 0)
    assert slow["connector.fc1.weight"] == pytest.approx(full["connector.fc1.weight"], rel=0.05)
    frozen = Trainer(cfg_for("und", tmp_path / "c", data, "steps=2", "optim.vision_lr_scale=0"))
    opt_params = {id(p) for g in frozen.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in opt_params for p in frozen.model.vision.parameters())
    assert all(moved(frozen)[n] == 0 for n in tower)
    with pytest.raises(ConfigError, match="vision_lr_scale"):
        cfg_for("und", tmp_path / "d", data, "optim.vision_lr_scale=-1")
