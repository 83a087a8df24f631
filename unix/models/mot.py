"""The mixture-of-transformers decoder: every layer has an `und` and a `gen` parameter set.

Each token is projected with its own branch's weights (q/k/v with bias, per-head QK RMSNorm,
RoPE), then ONE attention runs over the whole mixed sequence (cross-modal self-attention), then
each token goes through its own branch's output projection, norm and MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from unix.config import LMConfig
from unix.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope


class Branch(nn.Module):
    """One parameter set of a layer: all per-token weights of attention and MLP."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.post_attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.mlp = SwiGLU(D, cfg.intermediate_size)
        self.num_heads, self.head_dim = H, Dh

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (M, D) -> q, k, v (M, H, Dh), QK-norm applied (RoPE comes later, for all tokens at once)."""
        x = self.input_norm(h)
        shape = (h.shape[0], self.num_heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape))
        k = self.k_norm(self.k_proj(x).view(shape))
        return q, k, self.v_proj(x).view(shape)


@dataclass
class Route:
    """Which tokens of a (B, L) sequence use the gen weights; index lists computed once per forward.

    `const_idx`, when given, splits the und tokens: those in it see no gen token, directly or
    through another token, so with the und branch frozen nothing trainable reaches them and they
    are computed without autograd (a generation stage then spends no backward on the prompt)."""

    is_gen: torch.Tensor  # (B, L) bool
    und_idx: torch.Tensor  # flat indices into B*L (all und tokens, or the live ones when const_idx is set)
    gen_idx: torch.Tensor
    const_idx: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, is_gen: torch.Tensor, const: torch.Tensor | None = None) -> "Route":
        flat = is_gen.flatten()
        if const is None or not bool(const.any()):
            return cls(is_gen, torch.nonzero(~flat).flatten(), torch.nonzero(flat).flatten())
        const = const.flatten() & ~flat
        return cls(is_gen, torch.nonzero(~flat & ~const).flatten(), torch.nonzero(flat).flatten(),
                   torch.nonzero(const).flatten())


@dataclass
class Layout:
    """What a forward derives from where its tokens are, not from their values: which branch each
    token takes, its rotary angles and the attention plan. Built once per layout and reused by
    every step that has it (each denoising step of an image, each decoded token)."""

    route: Route
    cos: torch.Tensor  # (B, 1, L, Dh) rotary tables, broadcast over heads
    sin: torch.Tensor
    attend: Callable  # attend(q, k, v) -> (B, H, L, Dh): the attention plan


def _by_branch(route: Route, x: torch.Tensor, und_fn, gen_fn):
    """Apply und_fn to und tokens and gen_fn to gen tokens of flat x (B*L, ...); results scattered back."""
    const = route.const_idx
    if const is None:
        if len(route.gen_idx) == 0:
            return und_fn(x)
        if len(route.und_idx) == 0:
            return gen_fn(x)
    parts = [(route.und_idx, und_fn), (route.gen_idx, gen_fn)]
    ys = [(idx, fn(x[idx])) for idx, fn in parts if len(idx)]
    if const is not None:
        with torch.no_grad():
            ys.append((const, und_fn(x[const])))
    y0 = ys[0][1]
    out = y0.new_empty((x.shape[0],) + tuple(y0.shape[1:]))
    for idx, y in ys:
        out[idx] = y
    return out


class MoTLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.und = Branch(cfg)
        self.gen = Branch(cfg)

    def forward(self, h, route: Route, cos, sin, attend, cache=None):
        """h (B, L, D). `attend(q, k, v)` is the attention plan of this forward; `cache`, when given,
        is this layer's KV cache: `cache(k, v) -> (k_all, v_all)` prepends what earlier calls stored."""
        B, L, D = h.shape
        flat = h.reshape(B * L, D)

        def qkv_of(branch):  # q, k, v all in the compute dtype (RMSNorm casts back), so cat keeps it
            return lambda x: torch.cat(branch.qkv(x), dim=-1)  # (M, H, 3*Dh): one scatter for q, k, v

        qkv = _by_branch(route, flat, qkv_of(self.und), qkv_of(self.gen))
        q, k, v = qkv.view(B, L, *qkv.shape[1:]).transpose(1, 2).chunk(3, dim=-1)  # (B, H, L, Dh) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache(k, v)
        o = attend(q, k, v).transpose(1, 2).reshape(B * L, D)  # (B*L, H*Dh)
        h = flat + _by_branch(route, o, self.und.o_proj, self.gen.o_proj)

        def mlp_of(branch):
            return lambda x: branch.mlp(branch.post_attn_norm(x))

        h = h + _by_branch(route, h, mlp_of(self.und), mlp_of(self.gen))
        return h.view(B, L, D)


class MoTDecoder(nn.Module):
    """The layer stack plus the final norm of each branch. Embeddings and heads live in UniX."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.layers = nn.ModuleList(MoTLayer(cfg) for _ in range(cfg.num_layers))
        self.norm_und = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.checkpointing = False  # activation checkpointing per layer (training)

    def forward(self, h, layout: Layout, caches=None, hidden_at: int | None = None):
        """Returns the final-normed hidden states (B, L, D) and, if asked, the hidden states after
        layer `hidden_at` (0-based; used by REPA)."""
        route, cos, sin, attend = layout.route, layout.cos, layout.sin, layout.attend
        tapped = None
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, route, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, route, cos, sin, attend, cache)
            if hidden_at == i:
                tapped = h
        B, L, D = h.shape
        out = _by_branch(route, h.reshape(B * L, D), self.norm_und, self.norm_gen).view(B, L, D)
        return out, tapped
