"""Rectified flow: timesteps, interpolation, target, the sampling schedule and guidance.

Convention of the released model: `x_t = (1 - t) x0 + t eps`, t = 1 is pure noise, the model
predicts `v = eps - x0`, and sampling walks t from 1 to 0 with `x <- x - v dt`.
"""

from __future__ import annotations

import torch


def shift_t(t: torch.Tensor | float, shift: float):
    """s t / (1 + (s - 1) t): spends more steps at high noise when s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, shift: float = 1.0, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times t = sigmoid(N(0, 1)), optionally shifted."""
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift_t(t, shift) if shift != 1.0 else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-row t (broadcast over trailing dims)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def schedule(steps: int = 50, shift: float = 3.0) -> torch.Tensor:
    """The `steps` points linspace(1, 0, steps), shifted; sampling makes steps-1 Euler moves
    between consecutive points (the release calls this "50 timesteps")."""
    if steps < 2:
        raise ValueError("steps must be at least 2 (the schedule includes both ends)")
    return shift_t(torch.linspace(1.0, 0.0, steps, dtype=torch.float64), shift).float()


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """Guidance only while the SHIFTED t is in (lo, hi] (the release's convention)."""
    lo, hi = interval
    return lo < t <= hi


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + w (v_c - v_u), then rescaled per sample by min(1, |v_c| / |v|) over all its elements.

    Tensors are (B, N, C) (one row per sample). The release clamps with one global norm over its
    single sample; per-sample norms give the same result at batch 1 and keep samples independent.
    """
    v = v_uncond + scale * (v_cond - v_uncond)
    norm_c = v_cond.flatten(1).norm(dim=1)
    norm_v = v.flatten(1).norm(dim=1)
    factor = (norm_c / (norm_v + 1e-8)).clamp(max=1.0)
    return v * factor.view(-1, *([1] * (v.dim() - 1)))
