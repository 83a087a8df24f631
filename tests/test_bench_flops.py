"""The FLOP count behind scripts/bench_train.py's MFU: hand-computed layouts and costs, the pair count
against the real visibility rule, and a short run of the script itself."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unix.config import load_model_config
from unix.models.attention import dense_mask
from unix.models.sequence import LatentImage, Text, VitImage, pack
from unix.models.unix import UniX

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
bench = sys.modules.setdefault("bench_train", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(bench)

CFG = load_model_config("tiny")
P = 4  # ViT feature tokens per image in the hand-computed layouts


def _pack(samples, rows=False):
    return pack(samples, CFG.tokens, P, CFG.gen.max_latent_size, rows=rows)


def _vit():
    return VitImage(torch.zeros(3, 8, 8))


def _latents(h, w, noisy=True):
    return LatentImage(torch.zeros(h * w, 4), h, w, t=0.5, noisy=noisy)


def test_layout_of_a_packed_row_by_hand():
    # sample 0: [BOI 4xViT EOI] (6, full) | text 3 (causal) | answer 2 (causal)
    #   pairs 6*6 + (3*6 + 3*4/2) + (2*9 + 2*3/2) = 36 + 24 + 21 = 81, all und queries
    # sample 1: text 2 (causal) | [BOI 2x2 latents EOI] (6, noisy)
    #   pairs 3 + 6*(2 + 6) = 51, of which the 4 latent queries make 4*8 = 32
    # sample 2: text 1 | [BOI 1 latent EOI] (noisy) | text 2: the noisy segment is hidden from the last
    #   pairs 1 + 3*(1 + 3) + (2*1 + 3) = 18, latent queries 1*4 = 4
    batch = _pack([[_vit(), Text([5, 6, 7]), Text([8, 9], loss=True)],
                   [Text([5, 6]), _latents(2, 2)],
                   [Text([5]), _latents(1, 1), Text([6, 7])]])
    layout = bench.batch_layout(batch, logits=3)
    assert layout == bench.Layout(und_tokens=11 + 4 + 5, gen_tokens=4 + 1, vit_images=1, logits=3,
                                  und_pairs=81 + (51 - 32) + (18 - 4), gen_pairs=32 + 4)


def _random_samples(rng: random.Random):
    samples = []
    for _ in range(rng.randint(1, 5)):
        segs = [Text(list(range(5, 5 + rng.randint(1, 7))))] if rng.random() < 0.8 else []
        if rng.random() < 0.5:
            segs.insert(0, _vit())
        if rng.random() < 0.3:
            segs.append(_latents(rng.randint(1, 3), rng.randint(1, 3), noisy=False))
            segs.append(Text([5, 6]))
        segs.append(_latents(rng.randint(1, 3), rng.randint(1, 3)) if rng.random() < 0.6 else Text([7]))
        samples.append(segs)
    return samples


@pytest.mark.parametrize("rows", [False, True])
def test_pair_count_equals_the_visibility_rule(rows):
    """Visible pairs by query branch, against the dense mask of `attention.visible` (padding excluded)."""
    rng = random.Random(0)
    for _ in range(20):
        batch = _pack(_random_samples(rng), rows=rows)
        mask = dense_mask(batch.meta, batch.meta)[:, 0]  # (B, L, L)
        real = batch.meta.sample >= 0
        layout = bench.batch_layout(batch, logits=0)
        assert layout.gen_pairs == int(mask[batch.is_gen].sum())
        assert layout.und_pairs == int(mask[real & ~batch.is_gen].sum())
        assert layout.gen_tokens == int(batch.is_gen.sum()) and layout.und_tokens == int((real & ~batch.is_gen).sum())


def test_step_flops_by_hand():
    costs = bench.Costs(und_token=10, gen_token=100, vit_image=1000, connector_image=50, logit=7, attn_pair=1)
    layout = bench.Layout(und_tokens=15, gen_tokens=4, vit_images=1, logits=1, und_pairs=100, gen_pairs=32)
    # generation stage: only gen trains (3 x forward); und, tower, connector, head run forward once
    assert bench.step_flops(layout, costs, {"gen"}) == {
        "und": 150, "gen": 1200, "vision": 1050, "lm_head": 7, "attention": 100 + 96}
    # understanding stage with a frozen tower
    assert bench.step_flops(layout, costs, {"und", "connector"}) == {
        "und": 450, "gen": 400, "vision": 1000 + 150, "lm_head": 21, "attention": 300 + 32}


@pytest.mark.parametrize("preset", ["tiny", "unix"])
def test_model_costs_match_the_layer_formulas(preset):
    cfg = load_model_config(preset)
    lm, vis = cfg.lm, cfg.vision
    D, HD, I, Lyr = lm.hidden_size, lm.num_heads * lm.head_dim, lm.intermediate_size, lm.num_layers
    C, F = cfg.latent_token_dim, cfg.gen.timestep_freq_dim
    Pt, W = vis.num_patches, vis.width
    branch = Lyr * (3 * D * HD + HD * D + 3 * D * I)  # q, k, v, o; gate, up, down
    tower = 3 * vis.patch_size**2 * W + vis.depth * (3 * W * W + W * W + 2 * W * vis.mlp_dim)
    costs = bench.model_costs(cfg)
    assert costs == bench.Costs(
        und_token=2 * branch, gen_token=2 * (branch + C * D + F * D + D * D + D * C),
        vit_image=2 * Pt * tower + 4 * Pt * Pt * W * vis.depth, connector_image=2 * Pt * (W * D + D * D),
        logit=2 * D * lm.vocab_size, attn_pair=4 * HD * Lyr)
    if preset == "unix":  # Janus-Pro-1B's decoder: 1.23 B matrix weights a branch
        assert round(costs.und_token / 2 / 1e9, 2) == 1.23


def test_trained_parts():
    with torch.device("meta"):
        model = UniX(CFG)
    model.set_trainable(und=False, gen=True)
    assert bench.trained_parts(model) == {"gen"}
    model.set_trainable(und=True, gen=False, vision=True, tower=False)
    assert bench.trained_parts(model) == {"und", "connector"}


def test_peak_by_gpu_name():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 3050") is None


def test_script_runs_and_counts_every_step(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--preset", "tiny", "--stage", "gen",
                           "--steps", "2", "--warmup", "1", "--images", "12", "--token-budget", "512", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["measured_steps"] == 1 and not result["fsdp2"]
    assert result["flops_share"]["gen"] > 0.3 and result["flops_share"]["vision"] == 0  # gen stage: no ViT input
    assert abs(sum(result["flops_share"].values()) - 1) < 1e-3
    assert result["achieved_tflops"] > 0
