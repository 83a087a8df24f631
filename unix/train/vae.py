"""Stage 0 for new image domains (the CXR-Phantom set): train a small KL autoencoder.

    unix train-vae --shards data/phantom --out weights/phantom-vae --steps 3000

Loss: L1 reconstruction + a small KL term (LDM's recipe without the perceptual and adversarial
parts), plus optionally L1 on the images' horizontal and vertical differences (`edge_weight`): plain
L1 is content with a blurred rib cage, a blurred pleural line and no tubes, and the findings drawn
with thin lines are then lost for the generator (measured no better: docs/BENCHMARKS.md). At the
end the latent statistics of the data give the normalisation `z' = scale (z - shift)` that makes
latents roughly unit-variance; they are written to `vae.json` beside the weights and must be used
as the model's `vae.scale` / `vae.shift`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from unix.config import VAEConfig, load_model_config
from unix.data.dataset import RowStream, decode_gray
from unix.models.vae import LatentCodec, build_vae
from unix.weights.ldm_vae import save_vae_safetensors

log = logging.getLogger(__name__)


@dataclass
class VAETrainSettings:
    shards: str
    out: str
    preset: str = "tiny"
    steps: int = 3000
    batch_size: int = 16
    image_size: int = 256
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    crop: int = 0  # train on random crop x crop windows of the image_size images (0 = whole images)
    edge_weight: float = 0.0  # weight of the L1 on neighbouring-pixel differences


def edge_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and between the vertical neighbour differences of two batches."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return 0.5 * ((dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean())


def train_vae(s: VAETrainSettings) -> dict:
    cfg: VAEConfig = load_model_config(s.preset).vae
    torch.manual_seed(s.seed)
    # channels-last: oneDNN's convolutions (and their backward) run ~1.3x faster on CPU this way
    vae = build_vae(cfg).to(memory_format=torch.channels_last)
    vae.requires_grad_(True).train()
    stream = RowStream(s.shards, "train", s.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    warm = max(1, s.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, s.steps - warm))))

    crops = torch.Generator().manual_seed(s.seed)

    def batch(crop: int = 0) -> torch.Tensor:
        imgs = [decode_gray(stream.next()["image"], s.image_size, fill=0.0) for _ in range(s.batch_size)]
        if crop:  # a convolutional autoencoder learns the same local code from windows, at a fraction of the cost
            at = torch.randint(0, s.image_size - crop + 1, (len(imgs), 2), generator=crops).tolist()
            imgs = [im[:, y:y + crop, x:x + crop] for im, (y, x) in zip(imgs, at)]
        return (torch.stack(imgs).expand(-1, 3, -1, -1) * 2 - 1).contiguous(memory_format=torch.channels_last)

    bar = tqdm(range(s.steps), desc="train vae", unit="step")
    for _ in bar:
        x = batch(s.crop)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + s.kl_weight * kl * x[0].numel()
        if s.edge_weight:
            loss = loss + s.edge_weight * edge_l1(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{l1.item():.4f}")
    vae = vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(batch()).latent_dist.mean for _ in range(8)])
    stats = {"shift": float(z.mean()), "scale": float(1.0 / z.std()), "l1": l1.item()}
    codec = LatentCodec(vae, cfg)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    save_vae_safetensors(codec, out / "model.safetensors")
    (out / "vae.json").write_text(json.dumps(stats, indent=1))
    log.info("latent normalisation: vae.scale=%.6f vae.shift=%.6f", stats["scale"], stats["shift"])
    return stats
