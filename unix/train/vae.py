"""Stage 0 for new image domains (the CXR-Phantom set): train a small KL autoencoder.

    unix train-vae --shards runs/phantom/data --out runs/phantom/vae --preset phantom --steps 2000

Loss: L1 reconstruction + a small KL term (LDM's recipe without the perceptual and adversarial
parts), plus optionally L1 on the images' horizontal and vertical differences (`edge_weight`): plain
L1 is content with a blurred rib cage, a blurred pleural line and no tubes, and the findings drawn
with thin lines are then lost for the generator (measured no better: docs/BENCHMARKS.md). At the
end the latent statistics of the data give the normalisation `z' = scale (z - shift)` that makes
latents roughly unit-variance; they are written to `vae.json` beside the weights and must be used
as the model's `vae.scale` / `vae.shift`. `vae.json` also holds each channel's mean and inverse
spread after that, for the optional per-channel standardisation (`vae.channel_scale` /
`vae.channel_shift`).

A second, decoder-only pass (`init` = a trained VAE folder, `decoder_only`) fine-tunes the decoder
with the encoder frozen, so the latent space and its statistics stay as they are and a generator
trained on them needs no retraining. With `latent_noise` the decoder reads noisy latents
`z' + u * latent_noise * eps` (u uniform in [0, 1], eps standard normal, in the normalised space)
and must still return the clean image: a generator's samples lie a little off the latents of real
images, and the plain decoder renders such errors as rib-like stripes that the phantom classifier
reads as fractures and opacities (docs/BENCHMARKS.md).
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
from unix.errors import UserError
from unix.infer.io import atomic_write
from unix.models.vae import LatentCodec, build_vae
from unix.weights.ldm_vae import load_ldm_vae, save_vae_safetensors

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
    init: str = ""  # a train-vae output folder (model.safetensors + vae.json) to start from
    decoder_only: bool = False  # train the decoder alone (needs init); the encoder and its statistics stay
    latent_noise: float = 0.0  # decoder_only: largest std of the noise added to the normalised latents


def edge_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and between the vertical neighbour differences of two batches."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return 0.5 * ((dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean())


def _start(s: VAETrainSettings, cfg: VAEConfig):
    """The autoencoder to train (random, or `s.init`'s) and, from `s.init`, its latent statistics."""
    if not s.init:
        return build_vae(cfg), None
    init = Path(s.init)
    weights, stats_file = init / "model.safetensors", init / "vae.json"
    for f in (weights, stats_file):
        if not f.is_file():
            raise UserError(f"--init {init}: no {f.name} (a folder written by unix train-vae)")
    try:
        stats = json.loads(stats_file.read_text())
        scale, shift = float(stats["scale"]), float(stats["shift"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{stats_file}: cannot read the latent statistics ({e})") from None
    vae = load_ldm_vae(weights, cfg).vae
    return vae, {**stats, "scale": scale, "shift": shift}


def _latent_stats(vae, images: list[torch.Tensor]) -> dict:
    with torch.no_grad():
        z = torch.cat([vae.encode(x).latent_dist.mean for x in images])
    stats = {"shift": float(z.mean()), "scale": float(1.0 / z.std())}
    # and, for `vae.channel_scale` / `vae.channel_shift`, each channel's spread after that
    zn = stats["scale"] * (z - stats["shift"])
    stats["channel_scale"] = (1.0 / zn.std(dim=(0, 2, 3))).tolist()
    stats["channel_shift"] = zn.mean(dim=(0, 2, 3)).tolist()
    return stats


def train_vae(s: VAETrainSettings) -> dict:
    cfg: VAEConfig = load_model_config(s.preset).vae
    if s.decoder_only and not s.init:
        raise UserError("--decoder-only needs --init (the trained VAE whose decoder is fine-tuned)")
    if s.latent_noise and not s.decoder_only:
        raise UserError("--latent-noise needs --decoder-only (the noise is in the frozen encoder's normalised units)")
    if s.init and Path(s.init).resolve() == Path(s.out).resolve():
        raise UserError(f"--out {s.out} is the --init folder; write the fine-tuned VAE to a new folder")
    torch.manual_seed(s.seed)
    vae, init_stats = _start(s, cfg)
    # channels-last: oneDNN's convolutions (and their backward) run ~1.3x faster on CPU this way
    vae = vae.to(memory_format=torch.channels_last)
    vae.requires_grad_(False).train()
    trained = [vae.decoder, vae.post_quant_conv] if s.decoder_only else [vae]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    stream = RowStream(s.shards, "train", s.seed)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    warm = max(1, s.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, s.steps - warm))))

    crops = torch.Generator().manual_seed(s.seed)
    noise = torch.Generator().manual_seed(s.seed + 1)

    def batch(crop: int = 0) -> torch.Tensor:
        imgs = [stream.next_item(lambda row: decode_gray(row.get("image"), s.image_size, fill=0.0)) for _ in range(s.batch_size)]
        if crop:  # a convolutional autoencoder learns the same local code from windows, at a fraction of the cost
            at = torch.randint(0, s.image_size - crop + 1, (len(imgs), 2), generator=crops).tolist()
            imgs = [im[:, y:y + crop, x:x + crop] for im, (y, x) in zip(imgs, at)]
        return (torch.stack(imgs).expand(-1, 3, -1, -1) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def decoder_input(x: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's latents of x, plus the noise of `latent_noise`."""
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            if s.latent_noise:
                std = s.latent_noise * torch.rand(len(z), 1, 1, 1, generator=noise)
                z = z + std * torch.randn(z.shape, generator=noise) / init_stats["scale"]  # z' units -> raw
        return z

    bar = tqdm(range(s.steps), desc="train vae decoder" if s.decoder_only else "train vae", unit="step")
    l1 = torch.tensor(float("nan"))
    for _ in bar:
        x = batch(s.crop)
        if s.decoder_only:
            rec = vae.decode(decoder_input(x)).sample
            loss = l1 = (rec - x).abs().mean()
        else:
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
    # a frozen encoder keeps its statistics (a generator trained on them stays valid)
    stats = dict(init_stats) if s.decoder_only else _latent_stats(vae, [batch() for _ in range(8)])
    stats["l1"] = l1.item()
    if s.decoder_only:
        stats.update(decoder_from=str(s.init), latent_noise=s.latent_noise)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    save_vae_safetensors(LatentCodec(vae, cfg), out / "model.safetensors")
    atomic_write(out / "vae.json", json.dumps(stats, indent=1))
    log.info("latent normalisation: vae.scale=%.6f vae.shift=%.6f", stats["scale"], stats["shift"])
    return stats
