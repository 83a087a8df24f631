"""Report generation: prefill image + instruction once, then decode all rows together with the KV cache.

Sequence per image (reference section 3.3): `[BOI] ViT features [EOI]` (one position), the
instruction as a text segment, then decoding from BOS until EOS. Each row stops on its own; the
batch ends when every row has stopped or `max_new_tokens` is reached. Rows may have different
instructions: prompts of different lengths are right-padded (padding is invisible to every real
token) and each row decodes from its own next position.

Every decoded token has the same shapes: the cache is fixed in size and a token attends to all its
columns, its mask row, rotary angles and cache column picked by a counter on the device. So the
masks, rotary tables and route of all the tokens to come are built once per call (`TokenStep`),
the step (`decode_step`) is tensor work only and runs captured (`ModelConfig.step_capture`), the
generated ids stay on the device, and the host asks whether every row has stopped only every
`STOP_CHECK_EVERY` tokens on an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unix.models.attention import PAD_SAMPLE, Mode, StepPlan
from unix.models.cache import KVCache
from unix.models.capture import cache_length, capture_mode, captured
from unix.models.mot import Layout, Route
from unix.models.sequence import Text, VitImage, pack
from unix.tokenizer import REPORT_INSTRUCTION, Tokenizer
from unix.weights.inference import DEFAULT_MAX_NEW_TOKENS

DECODE_SEGMENT = 1 << 20  # segment id of the generated text: after every prompt segment
# On an accelerator, "has every row stopped?" is a host sync that drains the queue of launched
# work: ask every 16 tokens (at most 15 tokens decoded past the last EOS, then dropped). On the CPU
# there is no queue to drain, so every token.
STOP_CHECK_EVERY = 16


@dataclass
class ReportSettings:
    instruction: str = REPORT_INSTRUCTION  # the paper's FINDINGS-and-IMPRESSION instruction, for rows without their own
    # Tokens generated after the start BOS (the stop EOS not counted). None: the weights folder's
    # setting in a Pipeline (499 for the release, 500 for ours), DEFAULT_MAX_NEW_TOKENS otherwise.
    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0 = greedy (the paper's setting)
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # sampling seed; every row gets its own generator seeded with it


def row_instructions(settings: ReportSettings, n: int, instructions: list[str] | None) -> list[str]:
    """One instruction per row: the given ones, else the settings' for every row."""
    if instructions is None:
        return [settings.instruction] * n
    if len(instructions) != n:
        raise ValueError(f"{len(instructions)} instructions for {n} images")
    return list(instructions)


def max_new_tokens(settings: ReportSettings) -> int:
    return DEFAULT_MAX_NEW_TOKENS if settings.max_new_tokens is None else settings.max_new_tokens


def prompt_samples(model, tokenizer: Tokenizer, pixels: torch.Tensor, instructions: list[str]):
    return [[VitImage(p), Text(tokenizer.segment(instr))] for p, instr in zip(pixels, instructions)]


def choose(logits: torch.Tensor, settings: ReportSettings, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row (B, V) -> (B,): argmax, or temperature + top-p sampling."""
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1).cpu()
    if settings.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < settings.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    out = [torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(out).to(logits.device)


def stop_check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


class TokenStep:
    """What every decoded token of a call shares, built once: the attention masks of all the tokens
    to come against the fixed-shape cache, their rotary tables, the route (text: und weights)."""

    def __init__(self, model, cache: KVCache, position: torch.Tensor, sample: torch.Tensor, steps: int):
        B, device = position.shape[0], position.device
        planned = cache.new_meta(steps, Mode.CAUSAL, DECODE_SEGMENT, sample)  # (B, steps) at columns length + i
        cache.reserve(planned)
        self.model, self.cache = model, cache
        self.start = torch.tensor([cache.length], device=device)  # column of the first token (a tensor: any prompt length, one compile)
        self.plan = StepPlan(planned, cache.meta)
        positions = position[:, None] + torch.arange(steps, device=device)  # (B, steps) RoPE positions
        self.cos, self.sin = model.decoder.rope(positions, model.embed_tokens.weight.dtype)  # (B, 1, steps, Dh)
        self.route = Route.from_mask(torch.zeros(B, 1, dtype=torch.bool, device=device))
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # the planned token to decode next


def decode_step(step: TokenStep, token: torch.Tensor) -> torch.Tensor:
    """token (B,), the planned token `step.index` of each row -> next-token logits (B, V)."""
    i = step.index
    layout = Layout(step.route, step.cos.index_select(2, i), step.sin.index_select(2, i), step.plan.at(i))
    h = step.model.embed_tokens(token)[:, None]  # (B, 1, D)
    hidden, _ = step.model.decoder(h, layout, step.cache.layers_at(i + step.start))
    return step.model.lm_head(hidden[:, 0])


@torch.no_grad()
def generate_report_ids(model, tokenizer: Tokenizer, pixels: torch.Tensor, settings: ReportSettings = ReportSettings(),
                        instructions: list[str] | None = None) -> list[list[int]]:
    """pixels (B, 3, S, S) normalised -> generated ids per row (without the start BOS and the stop EOS).
    `instructions`: one per row (default: `settings.instruction` for all)."""
    B, device = pixels.shape[0], pixels.device
    eos, bos = model.cfg.tokens.eos, model.cfg.tokens.bos
    steps = max_new_tokens(settings)
    if steps <= 0:
        return [[] for _ in range(B)]
    batch = pack(prompt_samples(model, tokenizer, pixels, row_instructions(settings, B, instructions)), model.cfg.tokens,
                 model.cfg.vision.num_patches, model.cfg.gen.max_latent_size, rows=True).to(device)
    mode = capture_mode(model.cfg.step_capture, device)
    cache = KVCache.for_model(model, B, cache_length(batch.input_ids.shape[1] + steps, mode))
    model(batch, caches=cache.layers(), past_meta=cache.past_meta())
    cache.commit(batch.meta)
    real = batch.meta.sample != PAD_SAMPLE
    position = torch.where(real, batch.position_ids, -1).amax(dim=1) + 1  # (B,) next RoPE position per row
    state = TokenStep(model, cache, position, batch.meta.sample[:, 0], steps)
    token = torch.full((B,), bos, dtype=torch.long, device=device)
    step = captured(decode_step, state, (token,), mode)
    generators = [torch.Generator().manual_seed(settings.seed) for _ in range(B)] if settings.temperature > 0 else None
    ids = torch.zeros((B, steps), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    check_every = stop_check_every(device)
    for i in range(steps):
        token = choose(step(token), settings, generators)
        ids[:, i] = token
        done |= token == eos
        state.index += 1
        if (i + 1) % check_every == 0 and bool(done.all()):
            break
    return [row[: row.index(eos)] if eos in row else row for row in ids[:, : i + 1].tolist()]


@torch.no_grad()
def generate_report_ids_uncached(model, tokenizer: Tokenizer, pixels: torch.Tensor, settings: ReportSettings = ReportSettings(),
                                 instructions: list[str] | None = None) -> list[list[int]]:
    """Greedy decoding by full recomputation of the whole sequence at every token, one image at a
    time: the slow reference that the cached decoder must reproduce (tests, benchmarks)."""
    cfg = model.cfg
    outs = []
    for p, instruction in zip(pixels, row_instructions(settings, pixels.shape[0], instructions)):
        ids: list[int] = []
        for _ in range(max_new_tokens(settings)):
            samples = prompt_samples(model, tokenizer, p[None], [instruction])
            samples[0].append(Text([cfg.tokens.bos] + ids))
            batch = pack(samples, cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size).to(p.device)
            last = torch.zeros_like(batch.input_ids, dtype=torch.bool)
            last[0, -1] = True
            token = int(model(batch, logits_at=last).logits.argmax(-1))
            if token == cfg.tokens.eos:
                break
            ids.append(token)
        outs.append(ids)
    return outs
