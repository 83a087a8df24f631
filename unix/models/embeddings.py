"""Generation-branch inputs: timestep embedder and the fixed 2-D sin-cos latent position table."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (N,) in [0, 1] -> (N, dim) = [cos(t f), sin(t f)], cos first, t NOT scaled by 1000.

    Both quirks are the released model's (reference section 1.7) and must be kept for its weights.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear (names `mlp.0`, `mlp.2` as in the release)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) = [sin(p w), cos(p w)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) table; row y*grid + x = [E(x), E(y)] (column first, as the release's
    w-first meshgrid gives). Fixed, so it is recomputed rather than loaded."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb_x = sincos_1d(dim // 2, xs.flatten())
    emb_y = sincos_1d(dim // 2, ys.flatten())
    return torch.cat([emb_x, emb_y], dim=1).float()


def latent_position_ids(h: int, w: int, grid: int, device=None) -> torch.Tensor:
    """Row-major ids y*grid + x of an h x w latent image inside the grid x grid table (no interpolation)."""
    if h > grid or w > grid:
        raise ValueError(f"latent grid {h}x{w} exceeds the position table ({grid}x{grid})")
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (ys * grid + xs).flatten()
