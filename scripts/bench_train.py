"""Training throughput and MFU of one stage, through the real trainer, on phantom shards.

    .venv/bin/python scripts/bench_train.py --preset tiny --stage und            # CPU smoke run
    python scripts/bench_train.py --preset unix --stage gen --device cuda --steps 30 \\
        --token-budget 16384 --extra activation_checkpointing=true            # one GPU, random weights
    torchrun --standalone --nproc_per_node=8 scripts/bench_train.py --preset unix --stage gen --device cuda  # FSDP2
    .venv/bin/python scripts/bench_train.py --preset phantom --stage gen --token-budget 2048 --steps 60 --warmup 20 \\
        --extra "model_overrides=[gen.latent_patch_size=2,gen.max_latent_size=8]"  # 2x2 latents a token

Random weights (speed does not depend on them); a random VAE of the preset for generation stages.
The steps run through `Trainer.train_step` without checkpoints or the final export (saving is
not what is measured). tokens/s is the median over the steps after the first `--warmup` (packed
tokens, no padding; under torchrun the sum over ranks, timed on rank 0).

MFU counts the model FLOPs of each step from its packed layout (`step_flops`), summed over ranks,
over the step's time and the dense bf16 peak of every GPU used. The convention:
- a matrix product costs 2 x its weights per token forward; a token meets only its own branch (und
  tokens the und weights, latent tokens the gen weights and the latent heads); the vision tower and
  connector run once per ViT image; the vocabulary projection only where logits are computed;
- attention costs 4 x H*Dh per layer for each (query, key) pair the visibility rule lets through
  (QK^T and AV; masked pairs are not counted, whatever a kernel computes); the tower's attention
  is every patch pair of an image;
- trained parts cost 3 x their forward (forward + backward), frozen parts their forward once: the
  input gradients a frozen part passes through (BOI/EOI of a noisy image, 2 tokens a sample) and
  the recomputation of activation checkpointing are not counted (model FLOPs, not hardware FLOPs);
- embedding lookups, norms, biases, activations, RoPE and the loss are not counted, nor is the
  VAE encoding of a generation stage (data preparation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unix.config import ModelConfig
from unix.models.attention import PAD_SAMPLE, Mode
from unix.models.sequence import Kind, PackedBatch
from unix.models.unix import UniX

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; matched in order
# against torch.cuda.get_device_name(). --peak-tflops overrides.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0),
                    ("L40S", 362.1), ("B200", 2250.0))


# --- the FLOP count --------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Forward FLOPs of the model's parts, per unit of work."""

    und_token: float  # one und token through the und weights of every decoder layer
    gen_token: float  # one latent token through the gen weights of every layer + vae2llm, time embedder, llm2vae
    vit_image: float  # one ViT image through the tower: patch embedding, blocks, attention over its patches
    connector_image: float  # one ViT image's patch features through the connector
    logit: float  # the vocabulary projection at one position
    attn_pair: float  # one visible (query, key) pair in every decoder layer: QK^T and AV


@dataclass
class Layout:
    """What a packed batch asks of the model: token counts and visible attention pairs by branch."""

    und_tokens: int = 0
    gen_tokens: int = 0
    vit_images: int = 0
    logits: int = 0
    und_pairs: int = 0  # pairs whose query is an und token
    gen_pairs: int = 0  # pairs whose query is a latent token


def matmul_weights(module: nn.Module) -> int:
    """Weights of the linear and convolution layers of a module (2 x this = forward FLOPs per token
    for a linear layer; per output position for a convolution whose kernel equals its stride)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def model_costs(cfg: ModelConfig) -> Costs:
    """Per-part forward FLOPs, read off the model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = UniX(cfg)
    layers = model.decoder.layers
    P, W = cfg.vision.num_patches, cfg.vision.width
    return Costs(
        und_token=2.0 * sum(matmul_weights(layer.und) for layer in layers),
        gen_token=2.0 * (sum(matmul_weights(layer.gen) for layer in layers)
                         + sum(matmul_weights(m) for m in (model.vae2llm, model.time_embedder, model.llm2vae))),
        vit_image=2.0 * P * matmul_weights(model.vision) + 4.0 * P * P * W * cfg.vision.depth,
        connector_image=2.0 * P * matmul_weights(model.connector),
        logit=2.0 * matmul_weights(model.lm_head),
        attn_pair=4.0 * cfg.lm.num_heads * cfg.lm.head_dim * cfg.lm.num_layers,
    )


def batch_layout(batch: PackedBatch, logits: int) -> Layout:
    """Token counts and visible pairs of a packed batch, by the rule of `attention.visible`: a
    token sees every earlier non-noisy segment of its sample, and its own segment (causally for
    text). Counted per (row, sample, segment) from the metadata, never as an L x L mask."""
    meta = batch.meta
    segs: dict[tuple[int, int], dict[int, list[int]]] = {}  # (row, sample) -> segment -> [tokens, latents, mode]
    for row, (samples, segments, modes, kinds) in enumerate(zip(meta.sample.tolist(), meta.segment.tolist(),
                                                              meta.mode.tolist(), batch.kind.tolist())):
        for s, seg, mode, kind in zip(samples, segments, modes, kinds):
            if s == PAD_SAMPLE:
                continue
            entry = segs.setdefault((row, s), {}).setdefault(seg, [0, 0, mode])
            entry[0] += 1
            entry[1] += kind == Kind.LATENT
    out = Layout(vit_images=0 if batch.vit_pixels is None else batch.vit_pixels.shape[0], logits=logits)
    for by_segment in segs.values():
        seen = 0  # tokens of earlier non-noisy segments of this sample
        for seg in sorted(by_segment):
            n, g, mode = by_segment[seg]
            own = n * (n + 1) // 2 if mode == Mode.CAUSAL else n * n
            gen_pairs = g * (seen + n)  # latent tokens sit in bidirectional segments
            out.gen_pairs += gen_pairs
            out.und_pairs += n * seen + own - gen_pairs
            out.gen_tokens += g
            out.und_tokens += n - g
            if mode != Mode.NOISE:
                seen += n
    return out


def step_flops(layout: Layout, costs: Costs, trained: set[str]) -> dict[str, float]:
    """Model FLOPs of one training step by part; `trained`: which of und (decoder und weights and
    the vocabulary head), gen, tower, connector train (3 x forward) rather than run frozen (1 x)."""
    x = {part: 3.0 if part in trained else 1.0 for part in ("und", "gen", "tower", "connector")}
    return {
        "und": x["und"] * layout.und_tokens * costs.und_token,
        "gen": x["gen"] * layout.gen_tokens * costs.gen_token,
        "vision": x["tower"] * layout.vit_images * costs.vit_image + x["connector"] * layout.vit_images * costs.connector_image,
        "lm_head": x["und"] * layout.logits * costs.logit,
        "attention": (x["und"] * layout.und_pairs + x["gen"] * layout.gen_pairs) * costs.attn_pair,
    }


def trained_parts(model: UniX) -> set[str]:
    """The parts `step_flops` knows that have a trainable parameter."""
    parts = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.add("tower" if name.startswith("vision.") else "connector" if name.startswith("connector.")
                      else model.branch_of(name))
    return parts


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_batches():
    """Every batch the trainer packs, in order (the trainer builds it inside `train_step`; the
    packed layout is what the FLOP count needs)."""
    import unix.train.trainer as trainer_module

    seen, pack = [], trainer_module.pack

    def recording_pack(*args, **kwargs):
        seen.append(pack(*args, **kwargs))
        return seen[-1]

    trainer_module.pack = recording_pack
    try:
        yield seen
    finally:
        trainer_module.pack = pack


def shared_workdir(d) -> Path:
    """A temporary folder made by rank 0 and known to every rank (torchrun on one machine)."""
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="bench_train_") if d.main else None]
    if d.world > 1:
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def prepare(args, d, work: Path) -> list[str]:
    """Phantom shards (and a random VAE for a generation stage) made on rank 0; train overrides."""
    from unix.cli import main as unix_main
    from unix.config import load_model_config
    from unix.models.vae import LatentCodec, build_vae
    from unix.train import parallel
    from unix.weights.ldm_vae import save_vae_safetensors

    if d.main:
        unix_main(["data", "phantom", "--out", str(work / "data"), "--n", str(args.images), "--size", str(args.image_size)])
        if args.stage == "gen":
            vae_cfg = load_model_config(args.preset).vae
            save_vae_safetensors(LatentCodec(build_vae(vae_cfg), vae_cfg), work / "vae.safetensors")
    parallel.barrier()
    overrides = [f"data.shards={work / 'data'}", f"out={work / 'run'}", f"steps={args.steps}", f"model={args.preset}",
                 f"data.token_budget={args.token_budget}", "log_every=1000", f"save_every={args.steps + 1}",
                 "data.max_samples=4096"]
    if args.stage == "gen":
        overrides += [f"vae={work / 'vae.safetensors'}", "init=''", f"data.image_size={args.image_size}"]
    return overrides + args.extra


def measure(args, d, overrides: list[str]) -> tuple[list[dict], bool]:
    """Run the steps: per step the trainer's metrics, its time, and its FLOPs summed over ranks;
    and whether FSDP2 sharded the model."""
    import torch.distributed as dist

    from unix.train import parallel
    from unix.train.config import load_train_config
    from unix.train.trainer import Trainer

    name = "phantom_stage1.yaml" if args.stage == "und" else "phantom_stage2.yaml"
    trainer = Trainer(load_train_config(CONFIGS / name, overrides))
    costs, trained = model_costs(trainer.model.cfg), trained_parts(trainer.model)
    rows = []
    with recorded_batches() as batches:
        while trainer.step < args.steps:
            t0 = time.perf_counter()
            metrics = trainer.train_step()  # ends in .item(): the step's device work is done
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if len(batches) != trainer.step:
                raise RuntimeError("the trainer no longer packs each step through unix.train.trainer.pack: "
                                   "update recorded_batches() in scripts/bench_train.py")
            batch = batches[-1]
            flops = step_flops(batch_layout(batch, int(batch.text_loss.sum())), costs, trained)
            rows.append({**metrics, "seconds": seconds, "flops": flops})
    if d.world > 1:  # every rank packed its own batch: sum the FLOPs, part by part
        parts = list(rows[0]["flops"])
        t = torch.tensor([[r["flops"][p] for p in parts] for r in rows], dtype=torch.float64, device=d.device)
        dist.all_reduce(t)
        for r, values in zip(rows, t.tolist()):
            r["flops"] = dict(zip(parts, values))
    return rows, parallel.is_sharded(trainer.model)


def summarise(args, d, rows: list[dict], sharded: bool) -> dict:
    steady = rows[args.warmup:] or rows
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    flops = {part: statistics.median(r["flops"][part] for r in steady) for part in rows[0]["flops"]}
    total = sum(flops.values())
    achieved = statistics.median(sum(r["flops"].values()) / r["seconds"] for r in steady) / 1e12
    result = {"preset": args.preset, "stage": args.stage, "device": d.device.type, "processes": d.world, "fsdp2": sharded,
              "steps": len(rows), "measured_steps": len(steady), "tokens_per_step": med("tokens"),
              "samples_per_step": med("samples"), "seconds_per_step": med("seconds"),
              "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in steady),
              "samples_per_s": statistics.median(r["samples"] / r["seconds"] for r in steady),
              "flops_per_step": total, "flops_share": {p: round(v / total, 4) for p, v in flops.items()},
              "achieved_tflops": achieved}
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        peak = args.peak_tflops or peak_tflops(name)
        result.update(gpu=name, peak_tflops_per_gpu=peak, mfu=achieved / (peak * d.world) if peak else None)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", choices=["und", "gen"], default="und")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=300, help="phantom images to draw the steps from")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the trainer takes CUDA when it is there)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of one GPU (default: from the GPU's name, e.g. H100 SXM 989)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--extra", nargs="*", default=[], help="more train config overrides")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from unix.train import parallel

    d = parallel.setup()  # the trainer reuses this process group (torchrun: FSDP2 unless parallel=replicate)
    try:
        work = shared_workdir(d)
        rows, sharded = measure(args, d, prepare(args, d, work))
        parallel.barrier()
    finally:
        parallel.teardown()
    if not d.main:
        return 0
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    result = summarise(args, d, rows, sharded)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        from unix.infer.io import atomic_write

        atomic_write(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
