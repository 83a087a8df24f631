"""Forward-pass timing of the UniX model on a packed batch, per attention backend.

    python scripts/bench_model.py --preset tiny                       # CPU, fp32
    python scripts/bench_model.py --preset unix --device cuda --dtype bf16 --backends sdpa flex flash

Random weights; one packed sequence of `--samples` samples, each [ViT image | prompt | noisy latents].
Prints one Markdown row per backend: median ms per forward and tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unix.config import load_model_config
from unix.models.sequence import LatentImage, Text, VitImage, pack
from unix.models.unix import random_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_batch(cfg, samples: int, prompt_len: int, latent_side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, C = cfg.vision.image_size, cfg.vae.latent_channels
    rows = []
    for _ in range(samples):
        ids = torch.randint(5, cfg.lm.vocab_size, (prompt_len,), generator=g).tolist()
        rows.append([
            VitImage(torch.randn(3, S, S, generator=g)),
            Text([cfg.tokens.bos] + ids + [cfg.tokens.eos]),
            LatentImage(torch.randn(latent_side**2, C, generator=g), latent_side, latent_side, t=0.5),
        ])
    return pack(rows, cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "flex"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--latent-side", type=int, default=16, help="latent grid side (16 = 256 px)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = load_model_config(args.preset)
    model = random_model(cfg, device, DTYPES[args.dtype])
    batch = build_batch(cfg, args.samples, args.prompt_len, args.latent_side).to(device)
    n_tokens = batch.input_ids.numel()
    print(f"preset={args.preset} device={device} dtype={args.dtype} tokens={n_tokens} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M threads={torch.get_num_threads()}")
    print("| backend | ms / forward (median) | tokens/s |\n|---|---|---|")
    for backend in args.backends:
        try:
            with torch.no_grad():
                for _ in range(2):  # warm-up (and compile for flex on CUDA)
                    model(batch, backend=backend)
                sync(device)
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    model(batch, backend=backend)
                    sync(device)
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # a backend missing on this machine is a row, not a crash
            print(f"| {backend} | unavailable: {str(e).splitlines()[0][:80]} | |")
            continue
        ms = statistics.median(times) * 1e3
        print(f"| {backend} | {ms:.1f} | {n_tokens / (ms / 1e3):,.0f} |")


if __name__ == "__main__":
    main()
