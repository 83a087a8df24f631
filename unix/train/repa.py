"""REPA for the generation stages: align the gen branch's hidden states at the latent tokens with
the patch features of a frozen image encoder (Yu et al., "Representation Alignment", 2024).

loss_repa = mean over latent tokens of (1 - cos(head(h_k), f)), where h_k is the hidden state after
decoder layer k at that token, `head` a small trained MLP, and f the encoder's patch feature at the
same place (the encoder's feature map resized to the latent grid by area averaging). The total loss
is flow MSE + `repa.weight` x loss_repa. The head is trained with the gen branch; it is saved in
checkpoints (`repa_head.safetensors`) and never exported, so inference weights do not change.

Encoders: "raddino" (weights/rad-dino, its patch tokens) for real X-rays, "phantom" (the shipped
phantom classifier's stride-8 feature map) for the phantom set, and "vision": a frozen copy of the
model's own vision tower (SigLIP in the release, the pre-trained tower in the phantom model), which
needs no other weights and is not the feature space the phantom evaluation measures in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from unix.errors import UserError
from unix.models.vision import normalize_pixels


class PatchEncoder(nn.Module):
    """images (B, 1, H, W) in [0, 1] -> feature map (B, C, h', w'), frozen."""

    dim: int


class PhantomPatches(PatchEncoder):
    def __init__(self, weights_dir: str | Path):
        super().__init__()
        from unix.eval.phantom_classifier import load_classifier

        folder = Path(weights_dir) / "phantom-classifier"
        if not folder.is_dir():
            raise UserError(f"repa.encoder=phantom: no phantom classifier in {folder}")
        self.net = load_classifier(folder).eval().requires_grad_(False)
        self.upto = 3  # stem (/2) + two blocks (/4, /8): 16 x 16 cells at the classifier's 128 px
        self.dim = self.net.cfg.channels[self.upto - 1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.stem(self.net.prepare(images))
        for block in self.net.blocks[: self.upto - 1]:
            x = block(x)
        return x


class RadDinoPatches(PatchEncoder):
    def __init__(self, weights_dir: str | Path):
        super().__init__()
        from unix.eval.features import RadDinoExtractor

        ext = RadDinoExtractor(Path(weights_dir) / "rad-dino", device="cpu")
        self.preprocess, self.net = ext.preprocess, ext.model.requires_grad_(False)
        self.dim = self.net.config.hidden_size
        self.patch = self.net.config.patch_size
        self.skip = 1 + getattr(self.net.config, "num_register_tokens", 0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.expand(-1, 3, -1, -1))
        tokens = self.net(pixel_values=pixels).last_hidden_state[:, self.skip:]
        h, w = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class TowerPatches(PatchEncoder):
    """The model's vision tower, copied before any sharding so that it runs outside the model; its
    patch tokens as a (side x side) map. The gen stages decode images with a black letterbox where
    the und stages use white: only non-square images differ."""

    def __init__(self, tower: nn.Module, cfg):
        super().__init__()
        self.net = copy.deepcopy(tower).eval().requires_grad_(False)
        self.cfg, self.dim = cfg, cfg.width

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        S = self.cfg.image_size
        if images.shape[-2:] != (S, S):
            images = F.interpolate(images, size=(S, S), mode="area")
        tokens = self.net(normalize_pixels(images, self.cfg))
        side = S // self.cfg.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


# name -> build(weights_dir, model); only "vision" reads the model (a UniX)
ENCODERS = {
    "phantom": lambda weights_dir, model: PhantomPatches(weights_dir),
    "raddino": lambda weights_dir, model: RadDinoPatches(weights_dir),
    "vision": lambda weights_dir, model: TowerPatches(model.vision, model.cfg.vision),
}


def build_encoder(name: str, weights_dir: str, model: nn.Module | None = None) -> PatchEncoder:
    if name not in ENCODERS:
        raise UserError(f"repa.encoder: unknown encoder {name!r} ({', '.join(ENCODERS)})")
    return ENCODERS[name](weights_dir, model)


def target_tokens(encoder: PatchEncoder, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Encoder features at the latent grid, raster order: (B * h * w, C), like the latent tokens."""
    fmap = F.adaptive_avg_pool2d(encoder(images).float(), (h, w))
    return fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])


class RepaHead(nn.Module):
    """hidden (n, D) -> encoder space (n, C): the REPA projector (Linear-SiLU-Linear-SiLU-Linear)."""

    def __init__(self, hidden: int, out: int, width: int | None = None):
        super().__init__()
        width = width or 2 * hidden
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def repa_loss_sum(head: RepaHead, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(head(hidden), target) (normalised by the caller, like the flow loss)."""
    return (1 - F.cosine_similarity(head(hidden).float(), target.float(), dim=-1)).sum()


class Repa:
    """Everything REPA adds to a generation stage: the frozen encoder, the head and its own AdamW.
    The head is small and replicated on every rank; its gradients are averaged across ranks here."""

    def __init__(self, cfg, model: nn.Module, optim, device: torch.device):
        hidden, num_layers = model.cfg.lm.hidden_size, model.cfg.lm.num_layers
        self.weight = cfg.weight
        self.layer = cfg.layer if cfg.layer >= 0 else max(0, num_layers // 3 - 1)
        if self.layer >= num_layers:
            raise UserError(f"repa.layer={cfg.layer}: the decoder has {num_layers} layers (0-based)")
        self.encoder = build_encoder(cfg.encoder, cfg.weights_dir, model).to(device)
        self.head = RepaHead(hidden, self.encoder.dim).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=0.0)
        self.grad_clip = optim.grad_clip

    def targets(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return target_tokens(self.encoder, images, h, w)

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the head is a small fp32 module beside the model: bf16 hidden states are read in fp32
        return repa_loss_sum(self.head, hidden.float(), targets.to(hidden.device))

    def step(self, lr: float, world: int) -> None:
        params = [p for p in self.head.parameters() if p.grad is not None]
        if world > 1:
            import torch.distributed as dist

            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world  # the same mean over ranks FSDP takes for the model
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
