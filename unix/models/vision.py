"""SigLIP ViT (understanding image encoder) and the MLP connector into the decoder.

Parameter names map 1:1 onto the released `vit_model.vision_tower.*` tensors (timm layout):
`pos_embed`, `patch_embed.proj`, `blocks.{j}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unix.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, W), raster order


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # fused rows [q; k; v]
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, W = x.shape
        qkv = self.qkv(x).view(B, P, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, P, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, P, W))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU (SigLIP)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVisionTower(nn.Module):
    """pixels (B, 3, S, S), normalised -> (B, num_patches, width): last block + final LayerNorm.
    No class token; the attention-pool head of the release is never run, so it is not built."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        S = self.cfg.image_size
        # timm's PatchEmbed is strict too: the learned positions exist for one grid only.
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            raise ValueError(f"vision tower expects (B, 3, {S}, {S}) pixels, got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# Janus' projector (the training code) uses exact GELU; the reference inference code runs the tanh
# approximation. Exact is the default; "gelu_tanh" reproduces reference outputs (compat section 1.6).
_GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


class Connector(nn.Module):
    """fc1 -> GELU -> fc2 (released as `connector.layers.0/2`, Janus' MlpProjector)."""

    def __init__(self, in_dim: int, out_dim: int, act: Literal["gelu", "gelu_tanh"] = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.set_act(act)

    def set_act(self, act: Literal["gelu", "gelu_tanh"]) -> None:
        """Switch the activation (a weights folder's inference setting; no parameters change)."""
        if act not in _GELU_APPROX:
            raise ValueError(f"connector act must be one of {list(_GELU_APPROX)}, got {act!r}")
        self.act = act
        self.approximate = _GELU_APPROX[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def normalize_pixels(images: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """images in [0, 1], (B, 1|3, S, S) -> chest-X-ray normalised (B, 3, S, S); grey becomes 3 equal channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # the ViT was trained on RGB copies of the grey image
    return (images - cfg.image_mean) / cfg.image_std
