"""Does a generation model read its prompt? The stage-2 flow loss on test rows of a shard folder,
with each image's own report, with another image's report (a fixed shuffle), and with no prompt.
Same latents, timesteps and noise in all three; a model that ignores its prompt scores the three
alike. Cheaper and less noisy than finding agreement (scripts/bench_phantom.py).

    .venv/bin/python scripts/probe_conditioning.py --weights weights/phantom-tiny --data runs/phantom3/data
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_phantom import test_rows  # scripts/, beside this file
from unix.data.dataset import decode_gray
from unix.flow import interpolate, sample_t, velocity_target
from unix.infer import load_pipeline
from unix.models.sequence import LatentImage, Text, pack
from unix.models.vae import patchify


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/phantom-tiny")
    p.add_argument("--data", required=True, help="shard folder with a test split")
    p.add_argument("--n", type=int, default=96, help="test rows")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift of the probed t (3 = the sampler's; default 1, as training)")
    args = p.parse_args()
    pipe = load_pipeline(args.weights, device="cpu")
    model, codec, tok = pipe.model, pipe.codec, pipe.tokenizer
    rows = test_rows(args.data, args.n)
    sums = {"own": 0.0, "shuffled": 0.0, "none": 0.0}
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        gray = torch.stack([decode_gray(r["image"], args.image_size, fill=0.0) for r in chunk])
        z = codec.encode_gray(gray).float()
        p = model.cfg.gen.latent_patch_size
        h, w = z.shape[-2] // p, z.shape[-1] // p  # the token grid
        x0 = patchify(z, p)
        # each row's timestep and noise come from its own generator: the numbers do not depend on batching
        gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + i + k) for k in range(len(chunk))]
        t = torch.cat([sample_t(1, args.shift, generator=gk) for gk in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=gk) for gk in gens])
        x_t, target = interpolate(x0, eps, t), velocity_target(x0, eps)
        prompts = [tok.segment(r["report"]) for r in chunk]
        for name in sums:
            samples = []
            for k in range(len(chunk)):
                prompt = {"own": [Text(prompts[k])], "shuffled": [Text(prompts[(k + 1) % len(chunk)])], "none": []}[name]
                samples.append(prompt + [LatentImage(x_t[k], h, w, t=float(t[k]))])
            batch = pack(samples, model.cfg.tokens, model.cfg.vision.num_patches, model.cfg.gen.max_latent_size)
            v = model(batch).velocity
            sums[name] += (v - target.reshape(-1, target.shape[-1])).pow(2).mean(dim=-1).sum().item()
    n_tokens = len(rows) * h * w
    result = {k: v / n_tokens for k, v in sums.items()}
    result["gap_shuffled_minus_own"] = result["shuffled"] - result["own"]
    print(json.dumps({"weights": args.weights, "n": len(rows), "shift": args.shift, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
