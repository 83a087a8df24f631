"""Inference speed, side by side on the same model and seeds:

- images: our sampler (prompt prefilled once, guidance branches in one batched forward, KV cache)
  versus the naive one (prompt recomputed every step, branches as separate forwards, as the
  reference does): images/s and the ratio;
- reports: KV-cached decoding versus full recomputation: tokens/s.

    python scripts/bench_infer.py --preset tiny                                    # CPU
    python scripts/bench_infer.py --preset unix --device cuda --dtype bf16 --size 256 --batch 1 16

Random weights (speed does not depend on them); a random tokenizer-free prompt of `--prompt-len`.

- dispatch: the cost of one denoising step and one decoded token on a deep, narrow model (24
  layers, width 64, 16 px = one latent token: almost no arithmetic, so the time is what Python,
  the dispatcher, per-step set-up and per-call kernel overheads cost), per `step_capture` mode. A step is the difference of two runs that differ
  only in their number of steps, so prompt prefill and per-call set-up cancel out:

    python scripts/bench_infer.py --dispatch --capture eager compile
"""

from __future__ import annotations

import argparse
import time

import torch

from unix.config import load_model_config
from unix.infer.images import ImageSettings, sample_latents, sample_latents_naive
from unix.infer.reports import ReportSettings, generate_report_ids, generate_report_ids_uncached
from unix.models.unix import random_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FixedTokenizer:
    """Stands in for a tokenizer: every prompt becomes the same `n` random ids."""

    def __init__(self, cfg, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, cfg.lm.vocab_size, (n,), generator=g).tolist()
        self.tokens = cfg.tokens

    def segment(self, text: str) -> list[int]:
        return [self.tokens.bos] + self.ids + [self.tokens.eos]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` runs: on a shared machine the minimum is the least disturbed one."""
    return min(timed(fn, torch.device("cpu")) for _ in range(repeats))


def dispatch(args) -> None:
    overrides = [f"lm.num_layers={args.layers}"]
    cfg = load_model_config("tiny", overrides)
    modes = args.capture if hasattr(cfg, "step_capture") else ["eager (no step_capture: the code before it)"]
    print(f"tiny preset, {args.layers} layers, width {cfg.lm.hidden_size}, {args.dispatch_size} px, fp32, "
          f"batch 1, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print("\n| step_capture | ms / denoising step (guided: 2 rows) | ms / decoded token |\n|---|---|---|")
    for mode in modes:
        if hasattr(cfg, "step_capture"):
            cfg = load_model_config("tiny", overrides + [f"step_capture={mode}"])
        model = random_model(cfg, "cpu", torch.float32)
        with torch.no_grad():
            model.lm_head.weight[cfg.tokens.eos].zero_()  # never stop early
        tok = FixedTokenizer(cfg, args.prompt_len)
        px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)

        def images(steps: int):  # interval (0, 1]: every step guided, so every step is the same work
            return lambda: sample_latents(model, tok, ["p"], [0], ImageSettings(size=args.dispatch_size, steps=steps, interval=(0.0, 1.0)))

        def reports(tokens: int):
            return lambda: generate_report_ids(model, tok, px, ReportSettings(max_new_tokens=tokens))

        few, many = 2, 2 + args.dispatch_steps
        images(few)(), reports(few)()  # warm-up (and compilation, where the mode compiles)
        step = (best_time(images(many), args.repeats) - best_time(images(few), args.repeats)) / args.dispatch_steps
        token = (best_time(reports(many), args.repeats) - best_time(reports(few), args.repeats)) / args.dispatch_steps
        print(f"| {mode} | {step * 1e3:.2f} | {token * 1e3:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--report-tokens", type=int, default=64)
    ap.add_argument("--report-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-naive", action="store_true", help="only time our paths (the naive ones are slow at full size)")
    ap.add_argument("--dispatch", action="store_true", help="only the per-step dispatch table (CPU)")
    ap.add_argument("--capture", nargs="+", default=["eager", "compile"], help="step_capture modes of --dispatch")
    ap.add_argument("--layers", type=int, default=24, help="decoder depth of --dispatch")
    ap.add_argument("--dispatch-size", type=int, default=16, help="image side of --dispatch (16 px: one latent token)")
    ap.add_argument("--dispatch-steps", type=int, default=40, help="steps (and tokens) the --dispatch difference spans")
    ap.add_argument("--repeats", type=int, default=5, help="runs per --dispatch timing (the fastest counts)")
    args = ap.parse_args()
    if args.dispatch:
        return dispatch(args)

    device = torch.device(args.device)
    model = random_model(load_model_config(args.preset), device, DTYPES[args.dtype])
    tok = FixedTokenizer(model.cfg, args.prompt_len)
    print(f"preset={args.preset} device={device} dtype={args.dtype} size={args.size} steps={args.steps} threads={torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name()}")

    settings = ImageSettings(size=args.size, steps=args.steps)
    print("\n| images | batch | ours s/img | naive s/img | speed-up |\n|---|---|---|---|---|")
    for b in args.batch:
        prompts, seeds = ["p"] * b, list(range(b))
        sample_latents(model, tok, prompts, seeds, settings)  # warm-up: first calls pay one-off set-up costs
        ours = timed(lambda: sample_latents(model, tok, prompts, seeds, settings), device) / b
        naive = float("nan") if args.skip_naive else timed(lambda: sample_latents_naive(model, tok, prompts[:1], seeds[:1], settings), device)
        print(f"| {args.size} px | {b} | {ours:.3f} | {naive:.3f} | {naive / ours:.1f}x |")

    rs = ReportSettings(max_new_tokens=args.report_tokens)
    S = model.cfg.vision.image_size
    print("\n| reports | batch | cached tok/s | recompute tok/s | speed-up |\n|---|---|---|---|---|")
    eos = model.cfg.tokens.eos
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()  # random weights may stop early; keep every run at full length
    for b in args.report_batch:
        px = torch.randn(b, 3, S, S, device=device, dtype=DTYPES[args.dtype])
        generate_report_ids(model, tok, px[:1], ReportSettings(max_new_tokens=2))  # warm-up
        n = [0]
        t = timed(lambda: n.__setitem__(0, sum(map(len, generate_report_ids(model, tok, px, rs)))), device)
        cached = n[0] / t
        slow = float("nan")
        if not args.skip_naive:
            m = [0]
            t = timed(lambda: m.__setitem__(0, sum(map(len, generate_report_ids_uncached(model, tok, px[:1], rs)))), device)
            slow = m[0] / t
        print(f"| {args.report_tokens} new tokens | {b} | {cached:,.0f} | {slow:,.0f} | {cached / slow:.1f}x |")
    if device.type == "cuda":
        print(f"\npeak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
