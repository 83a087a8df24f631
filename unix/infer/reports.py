"""Report generation: prefill image + instruction once, then decode all rows together with the KV cache.

Sequence per image (reference section 3.3): `[BOI] ViT features [EOI]` (one position), the
instruction as a text segment, then decoding from BOS until EOS. Each row stops on its own; the
batch ends when every row has stopped or `max_new_tokens` is reached. Rows may have different
instructions: prompts of different lengths are right-padded (padding is invisible to every real
token) and each row decodes from its own next position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unix.models.attention import PAD_SAMPLE, Mode
from unix.models.cache import KVCache
from unix.models.sequence import Kind, PackedBatch, Text, VitImage, pack
from unix.tokenizer import REPORT_INSTRUCTION, Tokenizer
from unix.weights.inference import DEFAULT_MAX_NEW_TOKENS

DECODE_SEGMENT = 1 << 20  # segment id of the generated text: after every prompt segment


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


@torch.no_grad()
def generate_report_ids(model, tokenizer: Tokenizer, pixels: torch.Tensor, settings: ReportSettings = ReportSettings(),
                        instructions: list[str] | None = None) -> list[list[int]]:
    """pixels (B, 3, S, S) normalised -> generated ids per row (without the start BOS and the stop EOS).
    `instructions`: one per row (default: `settings.instruction` for all)."""
    B, device = pixels.shape[0], pixels.device
    eos, bos = model.cfg.tokens.eos, model.cfg.tokens.bos
    steps = max_new_tokens(settings)
    batch = pack(prompt_samples(model, tokenizer, pixels, row_instructions(settings, B, instructions)), model.cfg.tokens,
                 model.cfg.vision.num_patches, model.cfg.gen.max_latent_size, rows=True).to(device)
    cache = KVCache.for_model(model, B, batch.input_ids.shape[1] + steps + 1)
    model(batch, caches=cache.layers(), past_meta=cache.past_meta())
    cache.commit(batch.meta)
    real = batch.meta.sample != PAD_SAMPLE
    position = torch.where(real, batch.position_ids, -1).amax(dim=1) + 1  # (B,) next RoPE position per row
    token = torch.full((B,), bos, dtype=torch.long, device=device)
    generators = [torch.Generator().manual_seed(settings.seed) for _ in range(B)] if settings.temperature > 0 else None
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(steps):
        meta = cache.new_meta(1, Mode.CAUSAL, DECODE_SEGMENT, sample=batch.meta.sample[:, 0])
        step = PackedBatch(token[:, None], position[:, None], torch.full((B, 1), int(Kind.TEXT), device=device), meta)
        logits = model(step, logits_at=torch.ones((B, 1), dtype=torch.bool, device=device),
                       caches=cache.layers(), past_meta=cache.past_meta()).logits
        cache.commit(meta)
        token = choose(logits, settings, generators)
        done |= token == eos
        for b in torch.nonzero(~done).flatten().tolist():
            out[b].append(int(token[b]))
        if bool(done.all()):
            break
        position = position + 1
    return out


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
