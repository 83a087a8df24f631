"""Static, capturable inference: plans built once per call, steps that trace as one graph (no
host syncs), the same outputs as the eager per-step loop; bf16 q/k/v on every attention backend."""

import logging
import sys

import pytest
import torch

import unix.infer.images as images
import unix.infer.reports as reports
import unix.models.attention as attention
import unix.models.unix as unix_model
from unix.config import ConfigError, load_model_config, override_config
from unix.flow import guidance_active, guided_velocity, schedule
from unix.infer.images import IMAGE_SEGMENT, ImageSettings, image_block, initial_noise, sample_latents
from unix.infer.reports import DECODE_SEGMENT, ReportSettings, choose, generate_report_ids, max_new_tokens, prompt_samples, row_instructions
from unix.models.attention import PAD_SAMPLE, Mode
from unix.models.cache import KVCache
from unix.models.capture import cache_length, capture_mode
from unix.models.sequence import Kind, PackedBatch, Text, pack
from unix.models.unix import UniX
from unix.models.vae import unpatchify

PROMPTS = ["Small left pleural effusion.", "The heart is enlarged and there is no pneumothorax at all."]
SMALL = ImageSettings(size=64, steps=7, interval=(0.5, 1.0))  # guided steps, then unguided ones: both layouts


class CharTokenizer:
    """Stands in for the BPE tokenizer: one id per character (prompt lengths differ per text)."""

    def __init__(self, cfg):
        self.tokens = cfg.tokens

    def segment(self, text: str) -> list[int]:
        return [self.tokens.bos] + [10 + ord(c) % 200 for c in text] + [self.tokens.eos]


def make_model(overrides=()):
    cfg = load_model_config("tiny", list(overrides))
    torch.manual_seed(0)
    model = UniX(cfg).eval()
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.2)  # a non-zero velocity head
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # every norm weight matters
    return model, CharTokenizer(cfg)


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def pixels(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---- the eager per-step loops as they were before the static path (the oracles) ----

@torch.no_grad()
def eager_latents(model, tokenizer, prompts, seeds, settings):
    """Every denoising step through UniX.forward: plan, route and rotary tables rebuilt per step."""
    h = w = model.cfg.token_grid(settings.size)
    n, C, B = h * w, model.cfg.latent_token_dim, len(prompts)
    sched = schedule(settings.steps, settings.shift).tolist()
    use_cfg = settings.guidance != 1.0 and any(guidance_active(t, settings.interval) for t in sched[:-1])
    rows = 2 * B if use_cfg else B
    prompt = pack([[Text(tokenizer.segment(p))] for p in prompts], model.cfg.tokens, model.cfg.vision.num_patches,
                  model.cfg.gen.max_latent_size, rows=True)
    cache = KVCache.for_model(model, rows, prompt.input_ids.shape[1] + n + 2)
    model(prompt, caches=cache.layers(B), past_meta=cache.past_meta(B))
    cache.commit(prompt.meta)
    position = torch.where(prompt.meta.sample != PAD_SAMPLE, prompt.position_ids, -1).amax(dim=1) + 1
    position = torch.cat([position, torch.zeros(rows - B, dtype=torch.long)])
    x = initial_noise(seeds, n, C)
    for i in range(len(sched) - 1):
        t, dt = sched[i], sched[i] - sched[i + 1]
        guided = use_cfg and guidance_active(t, settings.interval)
        R = rows if guided else B
        x_in = torch.cat([x, x]) if guided else x
        meta = cache.new_meta(n + 2, Mode.NOISE, IMAGE_SEGMENT, sample=torch.arange(R))
        block = image_block(model, x_in, t, h, w, position[:R], meta)
        v = model(block, caches=cache.layers(R), past_meta=cache.past_meta(R)).velocity.float().view(R, n, C)
        if guided:
            v = guided_velocity(v[:B], v[B:], settings.guidance)
        x = x - v * dt
    p = model.cfg.gen.latent_patch_size
    return unpatchify(x, h * p, w * p, p)


@torch.no_grad()
def eager_report_ids(model, tokenizer, px, settings, instructions=None):
    """Every token through UniX.forward over a growing cache, read back to the host per token."""
    B = px.shape[0]
    eos, bos = model.cfg.tokens.eos, model.cfg.tokens.bos
    steps = max_new_tokens(settings)
    batch = pack(prompt_samples(model, tokenizer, px, row_instructions(settings, B, instructions)), model.cfg.tokens,
                 model.cfg.vision.num_patches, model.cfg.gen.max_latent_size, rows=True)
    cache = KVCache.for_model(model, B, batch.input_ids.shape[1] + steps + 1)
    model(batch, caches=cache.layers(), past_meta=cache.past_meta())
    cache.commit(batch.meta)
    position = torch.where(batch.meta.sample != PAD_SAMPLE, batch.position_ids, -1).amax(dim=1) + 1
    token = torch.full((B,), bos, dtype=torch.long)
    generators = [torch.Generator().manual_seed(settings.seed) for _ in range(B)] if settings.temperature > 0 else None
    out, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
    for _ in range(steps):
        meta = cache.new_meta(1, Mode.CAUSAL, DECODE_SEGMENT, sample=batch.meta.sample[:, 0])
        step = PackedBatch(token[:, None], position[:, None], torch.full((B, 1), int(Kind.TEXT)), meta)
        logits = model(step, logits_at=torch.ones((B, 1), dtype=torch.bool), caches=cache.layers(), past_meta=cache.past_meta()).logits
        cache.commit(meta)
        token = choose(logits, settings, generators)
        done |= token == eos
        for b in torch.nonzero(~done).flatten().tolist():
            out[b].append(int(token[b]))
        if bool(done.all()):
            break
        position = position + 1
    return out


# ---- same outputs ----

@pytest.mark.parametrize("overrides", [(), ("gen.latent_rope=2d",), ("gen.latent_patch_size=2",)])
def test_latents_equal_the_eager_loop_bitwise(overrides):
    model, tok = make_model(overrides)
    got = sample_latents(model, tok, PROMPTS, [1, 2], SMALL)
    assert torch.equal(got, eager_latents(model, tok, PROMPTS, [1, 2], SMALL))


@pytest.mark.parametrize("settings", [ReportSettings(max_new_tokens=12), ReportSettings(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=3)])
def test_reports_equal_the_eager_loop(tiny, settings):
    model, tok = tiny
    instructions = ["Describe the findings.", "Write the FINDINGS and the IMPRESSION of this chest radiograph."]  # rows padded
    got = generate_report_ids(model, tok, pixels(2), settings, instructions)
    assert got == eager_report_ids(model, tok, pixels(2), settings, instructions)
    assert all(len(r) == 12 for r in got)


def test_rows_stop_at_eos_with_sparse_stop_checks(tiny, monkeypatch):
    """Checked every 16 tokens (as on an accelerator), rows stop where the per-token check stops them."""
    model, tok = tiny
    eos = model.cfg.tokens.eos
    real_choose = reports.choose
    # row 0 stops after 3 tokens, row 1 after 6: the batch runs on past both EOS before it looks
    stops = {0: 3, 1: 6}
    calls = []

    def choosing(logits, *a):
        token = real_choose(logits, *a)
        for b, at in stops.items():
            if len(calls) == at:
                token[b] = eos
        calls.append(1)
        return token

    monkeypatch.setattr(reports, "choose", choosing)
    every_token = generate_report_ids(model, tok, pixels(2), ReportSettings(max_new_tokens=30))
    calls.clear()
    monkeypatch.setattr(reports, "stop_check_every", lambda device: 16)
    sparse = generate_report_ids(model, tok, pixels(2), ReportSettings(max_new_tokens=30))
    assert sparse == every_token and [len(r) for r in sparse] == [3, 6]
    assert len(calls) == 16  # ran on to the first check


# ---- built once per call, not per step ----

def count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_plans_routes_and_rope_are_built_once_per_layout(tiny, monkeypatch):
    model, tok = tiny
    plans = count_calls(monkeypatch, unix_model, "build_plan")
    rope = count_calls(monkeypatch, type(model.decoder.rope), "forward")
    counts = []
    for steps in (5, 9):  # both have guided steps (shifted t > 0.5) and unguided ones
        plans.clear(), rope.clear()
        sample_latents(model, tok, PROMPTS, [1, 2], ImageSettings(size=64, steps=steps, interval=(0.5, 1.0)))
        counts.append((len(plans), len(rope)))
    assert counts == [(3, 3), (3, 3)]  # prompt prefill, the guided layout, the unguided one
    counts = []
    for tokens in (3, 11):
        plans.clear(), rope.clear()
        generate_report_ids(model, tok, pixels(1), ReportSettings(max_new_tokens=tokens))
        counts.append((len(plans), len(rope)))
    assert counts == [(1, 2), (1, 2)]  # the prefill's plan; rope for the prefill and once for every token to come


# ---- one graph per step: no graph break, no host sync ----

def grab_steps(monkeypatch):
    """The (fn, state, args) of every step the samplers capture."""
    seen = []
    for module in (images, reports):
        real = module.captured
        monkeypatch.setattr(module, "captured", lambda fn, state, args, mode, real=real: seen.append((fn, state, args)) or real(fn, state, args, mode))
    return seen


def test_steps_trace_as_one_graph_without_host_syncs(tiny, monkeypatch):
    """torch.compile(fullgraph=True) refuses any graph break: a .item(), .tolist(), bool(tensor),
    nonzero or shape that depends on data inside a step would fail here."""
    model, tok = tiny
    seen = grab_steps(monkeypatch)
    sample_latents(model, tok, PROMPTS, [1, 2], ImageSettings(size=64, steps=5, interval=(0.5, 1.0)))
    generate_report_ids(model, tok, pixels(2), ReportSettings(max_new_tokens=2))
    assert [fn.__name__ for fn, _, _ in seen] == ["euler_step", "euler_step", "decode_step"]
    torch._dynamo.reset()
    with torch.no_grad():
        for fn, state, args in seen:
            (state.clock.index if fn is images.euler_step else state.index).zero_()
            traced = torch.compile(fn, fullgraph=True, backend="eager")(state, *args)
            assert torch.equal(traced, fn(state, *args))


@pytest.mark.slow
def test_compiled_steps_match_eager_and_compile_once():
    """step_capture=compile (inductor, fullgraph): the same outputs within float tolerance, and a
    prompt of another length reuses the compiled steps (the cache length is padded)."""
    from torch._dynamo.utils import counters

    model, tok = make_model(["step_capture=compile"])
    eager, _ = make_model(["step_capture=eager"])
    torch._dynamo.reset()
    z = sample_latents(model, tok, PROMPTS, [1, 2], SMALL)
    torch.testing.assert_close(z, sample_latents(eager, tok, PROMPTS, [1, 2], SMALL), atol=1e-5, rtol=1e-5)
    s = ReportSettings(max_new_tokens=12)
    assert generate_report_ids(model, tok, pixels(2), s) == generate_report_ids(eager, tok, pixels(2), s)
    graphs = counters["stats"]["unique_graphs"]
    sample_latents(model, tok, [p + " More words." for p in PROMPTS], [3, 4], SMALL)
    generate_report_ids(model, tok, pixels(2), s, ["Short.", "A much longer instruction than the default one."])
    assert counters["stats"]["unique_graphs"] == graphs


def test_state_tensors_are_found_through_the_state(tiny, monkeypatch):
    """What "compile" on CUDA keeps at fixed addresses: the cache, tables and counters, not the weights."""
    from unix.models.capture import state_tensors

    model, tok = tiny
    seen = grab_steps(monkeypatch)
    generate_report_ids(model, tok, pixels(1), ReportSettings(max_new_tokens=2))
    state = seen[0][1]
    found = {id(t) for t in state_tensors(state)}
    assert {id(state.cache.k[0]), id(state.cache.v[-1]), id(state.plan.masks), id(state.cos), id(state.index)} <= found
    assert not found & {id(p) for p in model.parameters()}


def test_capture_modes_and_the_config_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert capture_mode("auto", cpu) == "eager" and capture_mode("auto", cuda) == "graph"
    assert capture_mode("compile", cpu) == "compile"
    with pytest.raises(ValueError, match="CUDA graphs"):
        capture_mode("graph", cpu)
    assert cache_length(130, "compile") == 256 and cache_length(130, "eager") == cache_length(130, "graph") == 130
    cfg = load_model_config("tiny")
    assert cfg.step_capture == "auto" and override_config(cfg, ["step_capture=compile"]).step_capture == "compile"
    with pytest.raises(ConfigError, match="step_capture"):
        override_config(cfg, ["step_capture=always"])


# ---- bf16 reaches attention; the auto backend checks dtype and device ----

@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_qkv_reach_attention_in_the_compute_dtype(tiny, monkeypatch, backend):
    """fp32 weights under bf16 autocast (single-GPU training): q/k/v must arrive in bf16."""
    model, tok = tiny
    monkeypatch.setattr(attention, "_flash_varlen_kernel", lambda: attention.varlen_reference_kernel)
    seen, real = [], unix_model.build_plan

    def recording(name, q_meta, k_meta):
        plan = real(name, q_meta, k_meta)
        return lambda q, k, v: seen.append((q.dtype, k.dtype, v.dtype)) or plan(q, k, v)

    monkeypatch.setattr(unix_model, "build_plan", recording)
    batch = pack([[Text(tok.segment("Small effusion.")), Text(tok.segment("Cardiomegaly."))]], model.cfg.tokens,
                 model.cfg.vision.num_patches, model.cfg.gen.max_latent_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.compute_dtype() == torch.bfloat16
        model(batch, backend=backend)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)


def test_rmsnorm_order_is_qwen2s():
    """Known answer: transformers' Qwen2RMSNorm (statistics in fp32, cast back, times the weight)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from unix.models.layers import RMSNorm

    torch.manual_seed(0)
    x = torch.randn(5, 16).bfloat16()
    ours, ref = RMSNorm(16), Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    assert torch.equal(ours.bfloat16()(x), ref.bfloat16()(x))  # bf16 weights (released inference): unchanged
    got = ours.float()(x)  # fp32 weights (training under autocast): Qwen2's product, back in x's dtype
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.float()(x).bfloat16())


class FakeFlash:
    @staticmethod
    def flash_attn_varlen_func(*a, **k):
        raise AssertionError("not called")


@pytest.fixture
def fresh_flash_lookup():
    attention._flash_varlen_function.cache_clear()
    attention._notice.cache_clear()
    yield
    attention._flash_varlen_function.cache_clear()
    attention._notice.cache_clear()


def test_auto_backend_falls_back_with_one_notice(monkeypatch, caplog, fresh_flash_lookup):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn", FakeFlash)
    caplog.set_level(logging.INFO, logger="unix.models.attention")
    assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "flash"
    assert attention.resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert [attention.resolve_backend("auto", cuda, torch.float32) for _ in range(3)] == ["sdpa"] * 3
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "fp16/bf16" in notices[0] and "float32" in notices[0]
    assert attention.resolve_backend("sdpa", cuda, torch.bfloat16) == "sdpa"  # a named backend is used as named


class CountingFinder:
    """A meta-path finder that only counts the attempts to import flash_attn (and finds nothing)."""

    def __init__(self):
        self.tries = 0

    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn":
            self.tries += 1
        return None


def test_missing_flash_attn_is_looked_up_once(monkeypatch, caplog, fresh_flash_lookup):
    finder = CountingFinder()
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    caplog.set_level(logging.INFO, logger="unix.models.attention")
    for _ in range(3):
        assert attention.resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
        assert not attention.flash_available()
    assert finder.tries == 1
    assert [r.getMessage() for r in caplog.records] == ["flash-attn is not installed: attention runs on SDPA"]
