"""Training throughput and MFU of one stage, through the real trainer, on phantom shards.

    .venv/bin/python scripts/bench_train.py --preset tiny --stage und            # CPU smoke run
    python scripts/bench_train.py --preset unix --stage gen --device cuda --steps 30 \\
        --token-budget 16384 --extra activation_checkpointing=true            # one GPU, random weights
    .venv/bin/python scripts/bench_train.py --preset phantom --stage gen --token-budget 2048 --steps 60 --warmup 20 \\
        --extra "model_overrides=[gen.latent_patch_size=2,gen.max_latent_size=8]"  # 2x2 latents a token

Random weights (speed does not depend on them); a random VAE of the preset for generation stages.
tokens/s is the median over the steps after the first `--warmup`, read from OUT/metrics.jsonl
(packed tokens, no padding). MFU = 6 x (parameters of the trained branch and its heads) x tokens/s
/ peak, plus the frozen understanding branch's forward (2 x its parameters per und token) in a
generation stage; attention FLOPs are left out, so this slightly under-states MFU at long sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from unix.cli import main as unix_main
from unix.config import load_model_config
from unix.models.unix import UniX
from unix.models.vae import LatentCodec, build_vae
from unix.train.config import load_train_config
from unix.train.trainer import run
from unix.weights.ldm_vae import save_vae_safetensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def branch_params(cfg, stage: str) -> tuple[int, int]:
    """(trained parameters, frozen und parameters that still run forward) of a stage."""
    with torch.device("meta"):
        model = UniX(cfg)
    model.set_trainable(und=stage == "und", gen=stage == "gen")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_und = sum(p.numel() for n, p in model.named_parameters()
                     if not p.requires_grad and not n.startswith(("vision.", "connector.", "lm_head", "embed_tokens")))
    return trained, frozen_und if stage == "gen" else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", choices=["und", "gen"], default="und")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the trainer takes CUDA when it is there)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--extra", nargs="*", default=[], help="more train config overrides")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cfg = load_model_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unix_main(["data", "phantom", "--out", str(tmp / "data"), "--n", "300", "--size", str(args.image_size)])
        overrides = [f"data.shards={tmp / 'data'}", f"out={tmp / 'run'}", f"steps={args.steps}", f"model={args.preset}",
                     f"data.token_budget={args.token_budget}", "log_every=1000", f"save_every={args.steps + 1}",
                     "data.max_samples=4096"]
        if args.stage == "gen":
            save_vae_safetensors(LatentCodec(build_vae(cfg.vae), cfg.vae), tmp / "vae.safetensors")
            overrides += [f"vae={tmp / 'vae.safetensors'}", "init=''", f"data.image_size={args.image_size}"]
        name = "phantom_stage1.yaml" if args.stage == "und" else "phantom_stage2.yaml"
        run(load_train_config(CONFIGS / name, overrides + args.extra))
        rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[args.warmup:] or rows
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    trained, frozen = branch_params(cfg, args.stage)
    flops_per_token = 6 * trained + 2 * frozen
    result = {"preset": args.preset, "stage": args.stage, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "tokens_per_step": statistics.median(r["tokens"] for r in steady),
              "samples_per_step": statistics.median(r["samples"] for r in steady),
              "tokens_per_s": tok_s, "samples_per_s": statistics.median(r["samples"] * r["tokens_per_s"] / r["tokens"] for r in steady),
              "trained_params": trained, "achieved_tflops": flops_per_token * tok_s / 1e12}
    if torch.cuda.is_available():
        result["mfu"] = result["achieved_tflops"] / args.peak_tflops
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
