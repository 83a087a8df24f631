"""Cross-modal self-attention: ONE visibility rule, and the backends derived from it.

Every token carries metadata (`TokenMeta`): which packed sample it belongs to, which segment of that
sample, the segment's mode, and its order in the sequence. `visible()` is the whole rule (DESIGN.md
section 3); the dense SDPA mask, the FlexAttention block mask and the flash-attention varlen plan are
all computed from it, so they cannot drift apart.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import torch
import torch.nn.functional as F


class Mode(IntEnum):
    CAUSAL = 0  # text: causal inside the segment
    FULL = 1  # ViT image or clean VAE image: bidirectional inside the segment
    NOISE = 2  # noisy VAE latents: bidirectional inside, invisible to every other segment


_CAUSAL, _NOISE = int(Mode.CAUSAL), int(Mode.NOISE)
PAD_SAMPLE = -1  # sample id of padding tokens: they see only each other, and nobody sees them


@dataclass
class TokenMeta:
    """Per-token attention metadata, each (B, L) long. Segments of a sample are numbered in order."""

    sample: torch.Tensor
    segment: torch.Tensor
    mode: torch.Tensor
    order: torch.Tensor  # position along the sequence (monotone within a segment)

    def cat(self, other: "TokenMeta") -> "TokenMeta":
        return TokenMeta(*(torch.cat([a, b], dim=1) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.sample, self.segment, self.mode, self.order

    def to(self, device) -> "TokenMeta":
        return TokenMeta(*(t.to(device) for t in self.fields()))


def visible(q_sample, q_segment, q_mode, q_order, k_sample, k_segment, k_mode, k_order):
    """May a query token attend to a key token? Elementwise on broadcastable tensors.

    Same sample only; every token of an earlier segment unless that segment is noisy latents;
    inside the own segment, causal for text and bidirectional for images.
    """
    # Plain ints, not the enum members: flex-attention's tracing mis-handles IntEnum constants.
    same_sample = q_sample == k_sample
    earlier = (k_segment < q_segment) & (k_mode != _NOISE)
    own = (k_segment == q_segment) & ((q_mode != _CAUSAL) | (k_order <= q_order))
    return same_sample & (earlier | own)


def dense_mask(q: TokenMeta, k: TokenMeta) -> torch.Tensor:
    """Boolean (B, 1, Lq, Lk) mask: True where attention is allowed."""
    qf = [t[:, :, None] for t in q.fields()]
    kf = [t[:, None, :] for t in k.fields()]
    return visible(*qf, *kf)[:, None]


# ----------------------------------------------------------------------------------------------
# Backends. Each takes q (B, H, Lq, Dh), k/v (B, H, Lk, Dh) and returns (B, H, Lq, Dh).
# A plan is built once per forward from the metadata and reused by every layer.
# ----------------------------------------------------------------------------------------------


class SDPAPlan:
    """Portable path: scaled_dot_product_attention with a dense boolean mask.

    A packed training row holds many samples, and no token sees another sample, so one dense mask
    over the row would spend almost all of its work on masked-out pairs (14 samples in a row: 93%).
    When every sample of every row is one contiguous run of queries and of keys, the plan attends
    block by block, one SDPA call per sample: the same result at the cost of the diagonal blocks.
    """

    def __init__(self, q: TokenMeta, k: TokenMeta):
        self.blocks = _sample_blocks(q, k)
        if self.blocks is None:
            self.mask = dense_mask(q, k)
        else:
            self.masks = [[dense_mask(_meta_slice(q, b, qs, qe), _meta_slice(k, b, ks, ke)) for qs, qe, ks, ke in row]
                          for b, row in enumerate(self.blocks)]
            Lq, Lk = q.sample.shape[1], k.sample.shape[1]
            self.cuts = [(_cutter([(s, e) for s, e, _, _ in row], Lq), _cutter([(s, e) for _, _, s, e in row], Lk))
                         for row in self.blocks]

    def __call__(self, q, k, v):
        if self.blocks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        rows = []
        for masks, (cut_q, cut_k), qb, kb, vb in zip(self.masks, self.cuts, q.split(1), k.split(1), v.split(1)):
            rows.append(torch.cat([F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
                                   for qi, ki, vi, mask in zip(cut_q(qb), cut_k(kb), cut_k(vb), masks)], dim=2))
        return torch.cat(rows, dim=0)


def _cutter(spans: list[tuple[int, int]], length: int):
    """x -> [x[:, :, s:e] for each span]: one split when the spans tile the `length` tokens in order
    (a slice's backward writes a zero tensor of the whole row, once per sample), else slices."""
    if spans[0][0] == 0 and spans[-1][1] == length and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        sizes = [e - s for s, e in spans]
        return lambda x: x.split(sizes, dim=2)
    return lambda x: [x[:, :, s:e] for s, e in spans]


def _meta_slice(m: TokenMeta, b: int, start: int, end: int) -> TokenMeta:
    return TokenMeta(*(t[b:b + 1, start:end] for t in m.fields()))


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal values."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    return runs


def _sample_blocks(q: TokenMeta, k: TokenMeta) -> list[list[tuple[int, int, int, int]]] | None:
    """Per row, (q_start, q_end, k_start, k_end) of each sample, when some row packs several samples
    and each sample is one run of queries and one run of keys; else None (attend densely)."""
    if q.sample.device.type != "cpu" and q.sample.shape[1] * k.sample.shape[1] < 1 << 24:
        return None  # on an accelerator, one dense call is likely cheaper than many launches (not measured)
    blocks = []
    for qs_row, ks_row in zip(q.sample.tolist(), k.sample.tolist()):
        q_runs, k_runs = _runs(qs_row), _runs(ks_row)
        k_at = {sid: (s, e) for sid, s, e in k_runs}
        if len({sid for sid, _, _ in q_runs}) != len(q_runs) or len(k_at) != len(k_runs):
            return None  # a sample split into several runs
        if any(sid not in k_at for sid, _, _ in q_runs):
            return None
        blocks.append([(s, e, *k_at[sid]) for sid, s, e in q_runs])
    if all(len(row) == 1 for row in blocks):
        return None  # one sample per row: the dense call is the blocked call
    return blocks


class FlexPlan:
    """FlexAttention with a block mask built from the same rule (skips fully masked blocks)."""

    def __init__(self, q: TokenMeta, k: TokenMeta, compiled: bool | None = None):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        qf, kf = q.fields(), k.fields()

        def mask_mod(b, h, qi, ki):
            return visible(*(t[b, qi] for t in qf), *(t[b, ki] for t in kf))

        B, Lq = q.sample.shape
        Lk = k.sample.shape[1]
        device = q.sample.device
        self.block_mask = create_block_mask(mask_mod, B, None, Lq, Lk, device=device)
        if compiled is None:
            compiled = device.type == "cuda"
        self.fn = torch.compile(flex_attention) if compiled else flex_attention

    def __call__(self, q, k, v):
        with warnings.catch_warnings():  # eager flex (CPU tests) warns that it is unfused; we know
            warnings.simplefilter("ignore", UserWarning)
            return self.fn(q, k, v, block_mask=self.block_mask)


class VarlenPlan:
    """flash-attention varlen: each query segment attends to a gathered list of visible keys.

    The key list of a segment is what its LAST query token may see (for a causal segment that is
    the earlier segments plus the whole segment; flash's bottom-right causal alignment then trims
    it per row), so the plan is derived from `visible()` too. Causal and bidirectional segments
    go in two calls. `kernel` defaults to flash_attn_varlen_func; tests pass a reference kernel.
    """

    def __init__(self, q: TokenMeta, k: TokenMeta, kernel: Callable | None = None):
        self.kernel = kernel or _flash_varlen_kernel()
        mask = dense_mask(q, k)[:, 0]  # (B, Lq, Lk)
        groups = {True: ([], [], [0], [0]), False: ([], [], [0], [0])}  # q_idx, k_idx, cu_q, cu_k
        B, Lq = q.sample.shape
        Lk = k.sample.shape[1]
        for b in range(B):
            key = torch.stack([q.sample[b], q.segment[b]], dim=1)
            # Runs of equal (sample, segment) along the query sequence: one segment each.
            change = torch.ones(Lq, dtype=torch.bool, device=key.device)
            change[1:] = (key[1:] != key[:-1]).any(dim=1)
            starts = torch.nonzero(change).flatten().tolist() + [Lq]
            for s, e in zip(starts[:-1], starts[1:]):
                keys = torch.nonzero(mask[b, e - 1]).flatten()
                causal = bool(q.mode[b, s] == Mode.CAUSAL)
                q_idx, k_idx, cu_q, cu_k = groups[causal]
                q_idx.append(b * Lq + torch.arange(s, e, device=key.device))
                k_idx.append(b * Lk + keys)
                cu_q.append(cu_q[-1] + e - s)
                cu_k.append(cu_k[-1] + len(keys))
        self.calls = []
        for causal, (q_idx, k_idx, cu_q, cu_k) in groups.items():
            if q_idx:
                dev = q.sample.device
                cq, ck = torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev)
                mq, mk = int((cq[1:] - cq[:-1]).max()), int((ck[1:] - ck[:-1]).max())
                self.calls.append((causal, torch.cat(q_idx), torch.cat(k_idx), cq, ck, mq, mk))

    def __call__(self, q, k, v):
        B, H, Lq, Dh = q.shape
        q_flat = q.transpose(1, 2).reshape(B * Lq, H, Dh)  # (B*Lq, H, Dh): varlen wants token-major
        k_flat = k.transpose(1, 2).reshape(-1, H, Dh)
        v_flat = v.transpose(1, 2).reshape(-1, H, Dh)
        out = torch.zeros_like(q_flat)
        for causal, q_idx, k_idx, cq, ck, mq, mk in self.calls:
            o = self.kernel(q_flat[q_idx], k_flat[k_idx], v_flat[k_idx], cq, ck, mq, mk, causal=causal)
            out[q_idx] = o.to(out.dtype)
        return out.view(B, Lq, H, Dh).transpose(1, 2)


def _flash_varlen_kernel() -> Callable:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package (pip install 'unix[gpu]')") from None

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)

    return kernel


def varlen_reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """What flash_attn_varlen_func computes, in plain SDPA (CPU tests of the varlen plan)."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke]))  # (1, H, L, Dh)
        mask = None
        if causal:  # bottom-right aligned: query row r sees keys up to (Lk - Lq + r)
            lq, lk = qe - qs, ke - ks
            mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        out[qs:qe] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)[0].transpose(0, 1)
    return out


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' picks flash-attention on CUDA when installed, else SDPA."""
    if name == "auto":
        return "flash" if device.type == "cuda" and flash_available() else "sdpa"
    return name


def build_plan(backend: str, q: TokenMeta, k: TokenMeta):
    if backend == "sdpa":
        return SDPAPlan(q, k)
    if backend == "flex":
        return FlexPlan(q, k)
    if backend == "flash":
        return VarlenPlan(q, k)
    raise ValueError(f"unknown attention backend {backend!r} (sdpa, flex, flash)")
