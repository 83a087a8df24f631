"""Cross-modal self-attention: ONE visibility rule, and the backends derived from it.

Every token carries metadata (`TokenMeta`): which packed sample it belongs to, which segment of that
sample, the segment's mode, and its order in the sequence. `visible()` is the whole rule (DESIGN.md
section 3); the dense SDPA mask, the FlexAttention block mask and the flash-attention varlen plan are
all computed from it, so they cannot drift apart.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


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
# A plan is built once per layout from the metadata and reused by every layer (and, in inference,
# by every step with that layout).
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
        from torch.nn.attention.flex_attention import create_block_mask

        qf, kf = q.fields(), k.fields()

        def mask_mod(b, h, qi, ki):
            return visible(*(t[b, qi] for t in qf), *(t[b, ki] for t in kf))

        B, Lq = q.sample.shape
        Lk = k.sample.shape[1]
        device = q.sample.device
        self.block_mask = create_block_mask(mask_mod, B, None, Lq, Lk, device=device)
        if compiled is None:
            compiled = device.type == "cuda"
        self.fn = _compiled_flex() if compiled else _eager_flex

    def __call__(self, q, k, v):
        return self.fn(q, k, v, block_mask=self.block_mask)


@functools.cache
def _compiled_flex() -> Callable:
    """One compiled flex_attention per process: a new torch.compile wrapper per plan would compile again."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _eager_flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # eager flex (CPU tests) warns that it is unfused; we know
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask)


class VarlenPlan:
    """flash-attention varlen: each query segment attends to a gathered list of visible keys.

    The key list of a segment is what its LAST query token may see (for a causal segment that is
    the earlier segments plus the whole segment; flash's bottom-right causal alignment then trims
    it per row), so the plan is derived from `visible()` too. Causal and bidirectional segments
    go in two calls. `kernel` defaults to flash_attn_varlen_func; tests pass a reference kernel.
    The plan is built with whole-tensor operations (a few host syncs per plan, none per segment),
    and only (segments x Lk) of the rule is evaluated, never a dense Lq x Lk mask.
    """

    def __init__(self, q: TokenMeta, k: TokenMeta, kernel: Callable | None = None):
        self.kernel = kernel or _flash_varlen_kernel()
        B, Lq = q.sample.shape
        Lk = k.sample.shape[1]
        device = q.sample.device
        qf = [t.reshape(-1) for t in q.fields()]  # (B*Lq,) each: the rows one after another
        row = torch.arange(B, device=device).repeat_interleave(Lq)
        # A segment is a run of equal (row, sample, segment) along the flattened queries.
        new = torch.ones(B * Lq, dtype=torch.bool, device=device)
        new[1:] = (row[1:] != row[:-1]) | (qf[0][1:] != qf[0][:-1]) | (qf[1][1:] != qf[1][:-1])
        starts = torch.nonzero(new).flatten()  # (S,)
        ends = torch.cat([starts[1:], starts.new_tensor([B * Lq])])
        last, seg_row = ends - 1, row[ends - 1]
        keys = visible(*(t[last, None] for t in qf), *(t[seg_row] for t in k.fields()))  # (S, Lk)
        causal = qf[2][last] == _CAUSAL
        seg_of_query = torch.cumsum(new, 0) - 1
        q_len, k_len = ends - starts, keys.sum(1)
        self.calls = []
        for is_causal, pick in ((True, causal), (False, ~causal)):
            if not bool(pick.any()):
                continue
            seg, col = torch.nonzero(keys & pick[:, None], as_tuple=True)  # grouped by segment, in key order
            cu_q = F.pad(q_len[pick].cumsum(0), (1, 0)).int()
            cu_k = F.pad(k_len[pick].cumsum(0), (1, 0)).int()
            max_q, max_k = torch.stack([q_len[pick].max(), k_len[pick].max()]).tolist()
            q_idx = torch.nonzero(pick[seg_of_query]).flatten()
            self.calls.append((is_causal, q_idx, seg_row[seg] * Lk + col, cu_q, cu_k, max_q, max_k))

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


class StepPlan:
    """SDPA for decoding into a fixed-shape cache: one query per row, the same key length at every
    step. The masks of all planned queries (B, S) against every cache column are built once from
    `visible()`; a step picks its row with a device-side index, so nothing is rebuilt or read back
    to the host (columns not yet written are hidden by the causal rule or hold padding metadata)."""

    def __init__(self, q: TokenMeta, k: TokenMeta):
        self.masks = dense_mask(q, k)  # (B, 1, S, Lk)

    def at(self, step: torch.Tensor) -> Callable:
        """The attention of query `step` ((1,) long on the device) of every row."""
        mask = self.masks.index_select(2, step)  # (B, 1, 1, Lk)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flash_varlen_kernel() -> Callable:
    flash_attn_varlen_func = _flash_varlen_function()
    if flash_attn_varlen_func is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package (pip install 'unix[gpu]')")

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)

    return kernel


@functools.cache
def _flash_varlen_function() -> Callable | None:
    """flash_attn_varlen_func, or None when flash-attn is not installed. Imported once per process:
    a failed import searches sys.path again every time it is tried."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


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


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # the only dtypes flash-attention's kernels take


def flash_available() -> bool:
    return _flash_varlen_function() is not None and torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'auto' picks flash-attention on CUDA when it is installed and q/k/v come in fp16/bf16 (`dtype`:
    the compute dtype), else SDPA, saying once why flash was passed over. A named backend is used as named."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "sdpa"
    if _flash_varlen_function() is None:
        _notice(logging.INFO, "flash-attn is not installed: attention runs on SDPA")
        return "sdpa"
    if dtype not in FLASH_DTYPES:
        _notice(logging.WARNING, f"flash-attention takes fp16/bf16 and this model computes in {dtype}: attention runs on SDPA")
        return "sdpa"
    return "flash"


@functools.cache
def _notice(level: int, message: str) -> None:
    """Log a message once per process (a fallback chosen at every forward would repeat it)."""
    log.log(level, message)


def build_plan(backend: str, q: TokenMeta, k: TokenMeta):
    if backend == "sdpa":
        return SDPAPlan(q, k)
    if backend == "flex":
        return FlexPlan(q, k)
    if backend == "flash":
        return VarlenPlan(q, k)
    raise ValueError(f"unknown attention backend {backend!r} (sdpa, flex, flash)")
