"""Image sampling: prompt prefilled once, guidance branches batched in one forward, Euler steps.

Rows 0..B-1 are the conditional branch (prompt in the cache), rows B..2B-1 the unconditional one:
the same image block at position 0 with an empty context (their cache columns are padding).
Every denoising forward writes its keys/values into the cache's scratch columns without
committing them, so the prompt's keys/values are computed once and reused by every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unix.flow import guidance_active, guided_velocity, schedule
from unix.models.attention import PAD_SAMPLE, Mode
from unix.models.cache import KVCache
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


@torch.no_grad()
def sample_latents(model, tokenizer: Tokenizer, prompts: list[str], seeds: list[int], settings: ImageSettings = ImageSettings()) -> torch.Tensor:
    """Prompts -> normalised latents (B, C, h, w) (the VAE's grid, p x the token grid)."""
    h = w = model.cfg.token_grid(settings.size)
    n, C, B = h * w, model.cfg.latent_token_dim, len(prompts)
    device = next(model.parameters()).device
    sched = schedule(settings.steps, settings.shift).tolist()
    use_cfg = settings.guidance != 1.0 and any(guidance_active(t, settings.interval) for t in sched[:-1])
    rows = 2 * B if use_cfg else B

    prompt = pack([[Text(tokenizer.segment(p))] for p in prompts], model.cfg.tokens, model.cfg.vision.num_patches,
                  model.cfg.gen.max_latent_size, rows=True).to(device)
    cache = KVCache.for_model(model, rows, prompt.input_ids.shape[1] + n + 2)
    cache.rows = slice(0, B)
    model(prompt, caches=cache.layers(), past_meta=cache.past_meta())
    cache.commit(prompt.meta)
    real = prompt.meta.sample != PAD_SAMPLE
    position = torch.where(real, prompt.position_ids, -1).amax(dim=1) + 1  # cond rows: right after the prompt
    position = torch.cat([position, torch.zeros(rows - B, dtype=torch.long, device=device)])  # uncond rows: 0

    x = initial_noise(seeds, n, C).to(device=device, dtype=torch.float32)
    for i in range(len(sched) - 1):
        t, dt = sched[i], sched[i] - sched[i + 1]
        guided = use_cfg and guidance_active(t, settings.interval)
        R = rows if guided else B
        cache.rows = slice(0, R)
        x_in = torch.cat([x, x]) if guided else x
        meta = cache.new_meta(n + 2, Mode.NOISE, IMAGE_SEGMENT, sample=torch.arange(R, device=device))
        block = image_block(model, x_in.to(next(model.parameters()).dtype), t, h, w, position[:R], meta)
        v = model(block, caches=cache.layers(), past_meta=cache.past_meta()).velocity.float().view(R, n, C)
        if guided:
            v = guided_velocity(v[:B], v[B:], settings.guidance)
        x = x - v * dt
    p = model.cfg.gen.latent_patch_size
    return unpatchify(x, h * p, w * p, p)


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
