"""Building blocks of the decoder: RMSNorm, rotary position embedding, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight: the statistics in float32, cast back to x's dtype, then
    times the weight (Qwen2RMSNorm's order, reference section 1.2). The product is cast to x's dtype
    too: with float32 weights under bf16 autocast it would otherwise come out in float32 and carry
    q/k into attention in float32 (flash-attention takes only fp16/bf16). With weights in x's dtype
    (every released-weights path) that last cast does nothing."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype)).to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE tables for arbitrary integer positions (rotate-half layout, HF-LLaMA convention).

    Positions are (B, L), one per token, or (B, L, A): one per axis, frequency i turning with axis
    i mod A (interleaved, so every axis gets high and low frequencies). Equal axes give exactly
    the 1-D tables."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Not persistent: recomputed from the config, never part of a checkpoint.
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) or (B, L, A) -> cos, sin (B, 1, L, Dh), broadcastable over heads."""
        pos = position_ids.float()
        if pos.dim() == 3:
            axis = torch.arange(self.inv_freq.numel(), device=pos.device) % pos.shape[-1]
            freqs = pos[..., axis] * self.inv_freq.float()  # (B, L, Dh/2): frequency i at its axis
        else:
            freqs = pos[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, Dh) rotated by the per-token angles, in x's dtype (tables in float32 under
    autocast would otherwise promote q/k to float32)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (LLaMA / Qwen2 MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
