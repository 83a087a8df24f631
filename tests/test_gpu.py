"""GPU checks (issue 27), run by scripts/gpu_check.sh: attention backends agree in bf16, the sampler
and decoder equal the reference paths, captured steps (compile / CUDA graphs) replay what eager
computes, and a training step runs under FSDP2.

Without CUDA every test here is skipped, with the reason. `UNIX_GPU_TEST_DEVICE=cpu` runs them on CPU
instead (what a CPU can: no flash-attn, no CUDA graphs), to check the tests themselves; the dry run
of scripts/gpu_check.sh does that.
"""

import json
import os
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unix.config import ModelConfig, load_model_config
from unix.infer.images import ImageSettings, sample_latents, sample_latents_naive
from unix.infer.reports import ReportSettings, generate_report_ids, generate_report_ids_uncached
from unix.models.attention import build_plan, flash_available
from unix.models.sequence import LatentImage, Text, VitImage, pack
from unix.models.unix import random_model
from unix.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("UNIX_GPU_TEST_DEVICE") == "cpu":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("needs a CUDA device: torch.cuda.is_available() is False (UNIX_GPU_TEST_DEVICE=cpu runs the "
                "checks on CPU)", allow_module_level=True)
ON_CUDA = DEVICE.type == "cuda"
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); a few roundings in a row (q, k, v,
# the softmax, the output; or every layer of a model) add up to about 1e-2 of the largest value.
BF16_RTOL = 2e-2
CORPUS = ["FINDINGS: The heart is enlarged. Small left pleural effusion. IMPRESSION: Cardiomegaly."] * 10 + [
    "No pneumothorax. Lungs are clear."] * 10


def close_in_bf16(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Largest error within BF16_RTOL of the largest reference value."""
    return bool((out.float() - ref.float()).abs().max() <= BF16_RTOL * ref.float().abs().max())


def backends() -> list[str]:
    names = ["sdpa", "flex"]
    if ON_CUDA and flash_available():
        names.append("flash")
    return names


def mixed_batch(cfg: ModelConfig, seed: int = 0):
    """Three packed samples: [ViT | prompt | answer], [prompt | noisy latents], [noisy latents alone]."""
    g = torch.Generator().manual_seed(seed)
    S, C = cfg.vision.image_size, cfg.latent_token_dim
    ids = lambda n: torch.randint(5, cfg.lm.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    samples = [[VitImage(torch.randn(3, S, S, generator=g)), Text(ids(9)), Text(ids(6), loss=True)],
               [Text(ids(12)), LatentImage(torch.randn(16, C, generator=g), 4, 4, t=0.3)],
               [LatentImage(torch.randn(9, C, generator=g), 3, 3, t=0.8)]]
    return pack(samples, cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size).to(DEVICE)


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    return train_tokenizer(CORPUS, 300, cfg.tokens)


# --- attention backends in bf16 --------------------------------------------------------------------


def test_attention_plans_agree_in_bf16(cfg):
    """Every backend's plan on the same packed layout and bf16 q/k/v, against SDPA in fp32."""
    batch = mixed_batch(cfg)
    B, L, H, Dh = *batch.input_ids.shape, 4, 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, Dh, generator=g, device=DEVICE) for _ in range(3))
    reference = build_plan("sdpa", batch.meta, batch.meta)(q, k, v)
    for backend in backends():
        out = build_plan(backend, batch.meta, batch.meta)(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert out.dtype == torch.bfloat16, backend
        assert close_in_bf16(out, reference), backend


def test_model_backends_agree_in_bf16(cfg):
    """bf16 weights: every backend's velocity and logits match the fp32 model's within bf16 precision."""
    torch.manual_seed(0)
    model = random_model(cfg, DEVICE, torch.float32, std=0.05)
    batch = mixed_batch(cfg)
    with torch.no_grad():
        ref = model(batch, logits_at=batch.text_loss, backend="sdpa")
        model.bfloat16()
        for backend in backends():
            out = model(batch, logits_at=batch.text_loss, backend=backend)
            assert close_in_bf16(out.velocity, ref.velocity) and close_in_bf16(out.logits, ref.logits), backend


def test_fp32_weights_under_autocast_reach_every_backend(cfg):
    """Single-GPU training keeps fp32 weights under bf16 autocast: q/k/v must still reach attention in
    bf16 (flash-attn accepts nothing else), and the backends must agree."""
    if not ON_CUDA:
        pytest.skip("bf16 autocast on CUDA")
    torch.manual_seed(0)
    model = random_model(cfg, DEVICE, torch.float32, std=0.05).train()
    batch = mixed_batch(cfg)
    outs = {}
    for backend in backends():
        with torch.autocast("cuda", torch.bfloat16):
            outs[backend] = model(batch, backend=backend).velocity.float()
    for backend, out in outs.items():
        assert close_in_bf16(out, outs["sdpa"]), backend


# --- sampler and decoder ------------------------------------------------------------------------------

SMALL = ImageSettings(size=64, steps=6)


def test_sampler_and_decoder_equal_the_reference_paths(cfg, tok):
    """On the device: the cached, batched-guidance sampler equals the step-by-step recomputation,
    and cached decoding equals full recomputation (fp32, greedy)."""
    torch.manual_seed(0)
    model = random_model(cfg, DEVICE, torch.float32, std=0.05)
    prompts, seeds = ["Small left pleural effusion.", "No pneumothorax."], [0, 1]
    fast = sample_latents(model, tok, prompts, seeds, SMALL)
    slow = sample_latents_naive(model, tok, prompts, seeds, SMALL)
    assert (fast - slow).abs().max() < 1e-4
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rs = ReportSettings(max_new_tokens=8)
    assert generate_report_ids(model, tok, px, rs) == generate_report_ids_uncached(model, tok, px, rs)


def test_bf16_sampler_follows_fp32(cfg, tok):
    """Inference in bf16 weights moves the noise (nearly) where fp32 moves it, from the same weights."""
    from unix.infer.images import initial_noise
    from unix.models.vae import unpatchify

    torch.manual_seed(0)
    model = random_model(cfg, DEVICE, torch.float32, std=0.05)
    side = cfg.token_grid(SMALL.size)
    start = unpatchify(initial_noise([3], side * side, cfg.latent_token_dim), side, side, 1).to(DEVICE)
    ref = sample_latents(model, tok, ["Small left pleural effusion."], [3], SMALL) - start
    low = sample_latents(model.bfloat16(), tok, ["Small left pleural effusion."], [3], SMALL).float() - start
    assert ref.abs().max() > 0.01  # the velocity moved the noise: the comparison below means something
    assert F.cosine_similarity(low.flatten(), ref.flatten(), dim=0) > 0.99


# --- captured steps (the static inference path) ---------------------------------------------------


def capture_values() -> tuple[str, ...]:
    """The values of `ModelConfig.step_capture` (a Literal), empty before the static inference path."""
    hints = typing.get_type_hints(ModelConfig)
    return typing.get_args(hints["step_capture"]) if "step_capture" in hints else ()


EAGER = next((m for m in ("eager", "off") if m in capture_values()), "eager")  # runs a step as it is


def capture_modes() -> list[str]:
    """The capturing values of `step_capture`: "graph", "compile", ..."""
    return [m for m in capture_values() if m not in (EAGER, "auto")]


@pytest.mark.parametrize("mode", capture_modes() or ["(none)"])
def test_captured_steps_replay_eager(cfg, tok, mode):
    """A captured denoising step and decode step (CUDA graph replay, torch.compile) give what the
    eager steps give: the same latents (fp32, to 1e-4) and the same greedy ids, on a first call
    (which records or compiles) and on a second (which replays)."""
    if mode == "(none)":
        pytest.skip("ModelConfig has no step_capture field: the static inference path is not in this tree")
    if not ON_CUDA and mode == "graph":
        pytest.skip("step_capture=graph records CUDA graphs")
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    prompts, rs = ["Small left pleural effusion.", "No pneumothorax."], ReportSettings(max_new_tokens=8)
    results = {}
    for m in (EAGER, mode):
        mcfg = load_model_config("tiny")
        mcfg.step_capture = m
        torch.manual_seed(0)
        model = random_model(mcfg, DEVICE, torch.float32, std=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[m] = [(sample_latents(model, tok, prompts, [0, 1], SMALL), generate_report_ids(model, tok, px, rs))
                          for _ in range(2)]
    eager_img, eager_ids = results[EAGER][0]
    for img, ids in results[mode]:
        assert (img - eager_img).abs().max() < 1e-4
        assert ids == eager_ids


# --- training under FSDP2 -------------------------------------------------------------------------


def _train_loss(model, batch, target):
    out = model(batch, logits_at=batch.text_loss)
    targets = batch.input_ids[:, 1:][batch.text_loss[:, :-1]]
    return F.cross_entropy(out.logits.float(), targets) + (out.velocity.float() - target).pow(2).mean()


def test_training_step_under_fsdp2_single_process(cfg, tmp_path):
    """The project's FSDP2 set-up (`parallel.shard_model`, bf16 parameters, fp32 reduction) on a
    one-process group: the loss matches a plain bf16 copy of the model, every trained gradient
    arrives, and an AdamW step changes the sharded weights."""
    import torch.distributed as dist

    from unix.train import parallel

    backend = "nccl" if ON_CUDA else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = random_model(cfg, DEVICE, torch.float32, std=0.05).train()
        plain = random_model(cfg, DEVICE, torch.float32).train()
        plain.load_state_dict(model.state_dict())
        plain.bfloat16()
        batch = mixed_batch(cfg)
        target = torch.randn(batch.latents.shape[0], cfg.latent_token_dim, device=DEVICE)
        parallel.shard_model(model, parallel.Dist(device=DEVICE), bf16=True)
        assert parallel.is_sharded(model)
        loss = _train_loss(model, batch, target)
        assert torch.isclose(loss, _train_loss(plain, batch, target).float(), rtol=2e-2)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in params)
        before = [p.full_tensor().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()
        moved = sum(not torch.equal(b, p.full_tensor()) for b, p in zip(before, params))
        assert moved > 0.9 * len(params)  # every parameter with a non-zero gradient moves
        assert torch.isfinite(_train_loss(model, batch, target))
    finally:
        dist.destroy_process_group()


def test_training_steps_under_torchrun_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m unix.train` (FSDP2, the trainer's default) runs stage 1 of
    the tiny preset: losses logged, a weights folder exported. Two GPUs, or two CPU processes (gloo)."""
    if ON_CUDA and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for 2 NCCL processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    made = run("-m", "unix.cli", "data", "phantom", "--out", str(tmp_path / "data"), "--n", "30", "--size", "64")
    assert made.returncode == 0, made.stderr[-2000:]
    done = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unix.train",
               str(ROOT / "configs/train/phantom_stage1.yaml"), f"data.shards={tmp_path / 'data'}", f"out={tmp_path / 'run'}",
               "steps=2", "model=tiny", "data.token_budget=512", "save_every=100")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
