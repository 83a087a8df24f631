"""Image sampling: prompt prefilled once, guidance branches batched in one forward, Euler steps.

Rows 0..B-1 are the conditional branch (prompt in the cache), rows B..2B-1 the unconditional one:
the same image block at position 0 with an empty context (their cache columns are padding).
Every denoising forward writes its keys/values into the cache's scratch columns without
committing them, so the prompt's keys/values are computed once and reused by every step.

A step's layout (route, rotary tables, attention plan, the BOI/EOI embeddings) is the same at every
step with guidance and at every step without, so each is built once per call (`Denoiser`); the step
itself (`euler_step`) is tensor work only, with the schedule on the device, and runs captured
(`ModelConfig.step_capture`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unix.flow import guidance_active, guided_velocity, schedule
from unix.models.attention import PAD_SAMPLE, Mode
from unix.models.cache import KVCache
from unix.models.capture import cache_length, capture_mode, captured
from unix.models.embeddings import latent_position_ids
from unix.models.sequence import Kind, LatentImage, PackedBatch, Text, pack
from unix.models.vae import unpatchify
from unix.tokenizer import Tokenizer

IMAGE_SEGMENT = 1 << 20  # segment id of the noisy image block: after every prompt segment


@dataclass
class ImageSettings:
    size: int = 512  # output side in pixels (multiple of the latent stride, VAE downsampling x patch, within the table)
    steps: int = 50  # schedule points; steps - 1 Euler moves (the release's "50 timesteps")
    guidance: float = 2.0  # classifier-free guidance scale w (1.0 = no guidance)
    shift: float = 3.0  # timestep shift s of the sampling schedule
    interval: tuple[float, float] = (0.4, 1.0)  # guidance only while the shifted t is in (lo, hi]


def initial_noise(seeds: list[int], n: int, channels: int) -> torch.Tensor:
    """(B, n, C) noise, each row from its own CPU generator: independent of batch and device."""
    return torch.stack([torch.randn(n, channels, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def image_block(model, x: torch.Tensor, t: float, h: int, w: int, position: torch.Tensor, meta) -> PackedBatch:
    """The query block [BOI, h*w latents, EOI] for every row of x (R, n, C)."""
    R, n, _ = x.shape
    tok, device = model.cfg.tokens, x.device
    ids = torch.zeros((R, n + 2), dtype=torch.long, device=device)
    ids[:, 0], ids[:, -1] = tok.boi, tok.eoi
    kind = torch.full((R, n + 2), int(Kind.LATENT), device=device)
    kind[:, 0] = kind[:, -1] = int(Kind.TEXT)
    pos_ids = latent_position_ids(h, w, model.cfg.gen.max_latent_size, device).repeat(R)
    return PackedBatch(ids, position[:, None].expand(R, n + 2), kind, meta, latents=x.reshape(R * n, -1),
                       timesteps=torch.full((R * n,), float(t), device=device), latent_pos=pos_ids)


class Denoiser:
    """What an Euler step of one layout (R rows: B conditional, then B unconditional when guided)
    shares with every other step of that layout: built once per sampling call."""

    def __init__(self, model, cache: KVCache, h: int, w: int, position: torch.Tensor, clock: "Clock", guidance: float | None):
        R, n, device = position.shape[0], h * w, position.device
        self.model, self.clock = model, clock
        start = cache.max_len - (n + 2)  # the block fills the last columns (after padding, when the cache is padded)
        meta = cache.new_meta(n + 2, Mode.NOISE, IMAGE_SEGMENT, sample=torch.arange(R, device=device), start=start)
        cache.reserve(meta)
        dtype = next(model.parameters()).dtype
        block = image_block(model, torch.zeros(R, n, model.cfg.latent_token_dim, device=device, dtype=dtype), 0.0, h, w, position, meta)
        self.layout = model.layout(block, cache.column_meta(R))
        self.caches = cache.layers(R, start)
        self.cache = cache
        ends = model.embed_tokens(block.input_ids[:, [0, -1]])  # (R, 2, D): BOI and EOI
        self.boi, self.eoi = ends[:, :1], ends[:, 1:]
        self.latent_pos = block.latent_pos
        self.scale = None if guidance is None else torch.tensor(guidance, device=device)  # a tensor: no recompile per value


class Clock:
    """The schedule on the device and the index of the current step (advanced on the device)."""

    def __init__(self, sched: list[float], device):
        points = torch.tensor(sched, dtype=torch.float64)  # float32 values, differences in float64 as the eager loop took them
        self.times = points.float().to(device)
        self.dts = (points[:-1] - points[1:]).float().to(device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)


def euler_step(step: Denoiser, x: torch.Tensor) -> torch.Tensor:
    """x (B, n, C) float32 at schedule point `clock.index` -> x at the next point: one forward of
    the layout's rows, guidance when the layout has the unconditional rows, the Euler move."""
    B, n, C = x.shape
    model = step.model
    t = step.clock.times.index_select(0, step.clock.index)  # (1,)
    dt = step.clock.dts.index_select(0, step.clock.index)
    x_in = torch.cat([x, x]) if step.scale is not None else x
    R = x_in.shape[0]
    lat = model.latent_embed(x_in.reshape(R * n, C).to(step.boi.dtype), t.expand(R * n), step.latent_pos)
    h = torch.cat([step.boi, lat.view(R, n, -1).to(step.boi.dtype), step.eoi], dim=1)  # (R, n + 2, D)
    hidden, _ = model.decoder(h, step.layout, step.caches)
    v = model.llm2vae(hidden[:, 1:-1].reshape(R * n, -1)).float().view(R, n, C)
    if step.scale is not None:
        v = guided_velocity(v[:B], v[B:], step.scale)
    return x - v * dt


@torch.no_grad()
def sample_latents(model, tokenizer: Tokenizer, prompts: list[str], seeds: list[int], settings: ImageSettings = ImageSettings(),
                   on_step=None) -> torch.Tensor:
    """Prompts -> normalised latents (B, C, h, w) (the VAE's grid, p x the token grid).
    `on_step(done, total)` is called after each Euler step (a progress bar; it reads nothing back)."""
    h = w = model.cfg.token_grid(settings.size)
    n, C, B = h * w, model.cfg.latent_token_dim, len(prompts)
    device = next(model.parameters()).device
    sched = schedule(settings.steps, settings.shift).tolist()
    use_cfg = settings.guidance != 1.0 and any(guidance_active(t, settings.interval) for t in sched[:-1])
    rows = 2 * B if use_cfg else B

    prompt = pack([[Text(tokenizer.segment(p))] for p in prompts], model.cfg.tokens, model.cfg.vision.num_patches,
                  model.cfg.gen.max_latent_size, rows=True).to(device)
    mode = capture_mode(model.cfg.step_capture, device)
    cache = KVCache.for_model(model, rows, cache_length(prompt.input_ids.shape[1] + n + 2, mode))
    model(prompt, caches=cache.layers(B), past_meta=cache.past_meta(B))
    cache.commit(prompt.meta)
    real = prompt.meta.sample != PAD_SAMPLE
    position = torch.where(real, prompt.position_ids, -1).amax(dim=1) + 1  # cond rows: right after the prompt
    position = torch.cat([position, torch.zeros(rows - B, dtype=torch.long, device=device)])  # uncond rows: 0

    x = initial_noise(seeds, n, C).to(device=device, dtype=torch.float32)
    clock, steps = Clock(sched, device), {}
    for i in range(len(sched) - 1):
        guided = use_cfg and guidance_active(sched[i], settings.interval)
        if guided not in steps:  # each layout built (and captured) at its first step
            R = rows if guided else B
            state = Denoiser(model, cache, h, w, position[:R], clock, settings.guidance if guided else None)
            steps[guided] = captured(euler_step, state, (x,), mode)
        x = steps[guided](x)
        clock.index += 1
        if on_step is not None:
            on_step(i + 1, len(sched) - 1)
    p = model.cfg.gen.latent_patch_size
    return unpatchify(x.clone(), h * p, w * p, p)  # a clone: a CUDA graph's output buffer is its own


@torch.no_grad()
def sample_latents_naive(model, tokenizer: Tokenizer, prompts: list[str], seeds: list[int], settings: ImageSettings = ImageSettings()) -> torch.Tensor:
    """The reference's way: one sample at a time, the prompt recomputed at every step, the
    guidance branches run as separate forwards. Slow on purpose (tests, benchmarks)."""
    h = w = model.cfg.token_grid(settings.size)
    n, C = h * w, model.cfg.latent_token_dim
    device = next(model.parameters()).device
    sched = schedule(settings.steps, settings.shift).tolist()
    cfg = model.cfg
    outs = []
    for prompt, seed in zip(prompts, seeds):
        x = initial_noise([seed], n, C)[0].to(device)
        for i in range(len(sched) - 1):
            t, dt = sched[i], sched[i] - sched[i + 1]

            def velocity(context):
                batch = pack([context + [LatentImage(x, h, w, t=t)]], cfg.tokens, cfg.vision.num_patches, cfg.gen.max_latent_size)
                return model(batch.to(device)).velocity.float()[None]

            v = velocity([Text(tokenizer.segment(prompt))])
            if settings.guidance != 1.0 and guidance_active(t, settings.interval):
                v = guided_velocity(v, velocity([]), settings.guidance)
            x = x - v[0] * dt
        outs.append(x)
    p = cfg.gen.latent_patch_size
    return unpatchify(torch.stack(outs), h * p, w * p, p)
