"""A preallocated, fixed-shape KV cache, shared by report decoding and image sampling.

Keys/values live in one buffer per layer, (B, H, max_len, Dh) each (separate tensors, not one 5-D
buffer: a compiled step that writes into slices of one shared buffer copies all of it per layer),
with the attention metadata of each column. Two ways to write into it:

- `layers(rows, start)`: the new tokens go in place at columns [start, start + n) (start defaults
  to the context length) and attend to the views [:start + n] (host-side sizes; prompt prefill,
  and every denoising step, whose columns never move). `commit(meta)` makes them context; a forward
  that is not committed (a denoising step) leaves the context as it was, and the next one
  overwrites the same scratch columns.
- `layers_at(column)`: one token per row goes to a column given as a device tensor, and attends to
  every column (decoding: the same shapes at every token, nothing read back to the host; the
  attention mask hides the columns not written yet). `reserve(meta)` first writes the metadata of
  the tokens to come, so the masks of all of them can be built at once.
"""

from __future__ import annotations

import torch

from unix.models.attention import PAD_SAMPLE, Mode, TokenMeta


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, num_heads, max_len, head_dim)
        # Zeros, not empty: masked columns still enter the product with the attention weights,
        # and uninitialised memory may hold NaN.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        full = lambda value: torch.full((batch, max_len), value, dtype=torch.long, device=device)  # noqa: E731
        self.meta = TokenMeta(full(PAD_SAMPLE), full(0), full(int(Mode.FULL)), torch.arange(max_len, device=device).expand(batch, max_len).contiguous())
        self.length = 0  # committed columns
        self.max_len = max_len
        self.batch = batch

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, device=None, dtype=None) -> "KVCache":
        lm = model.cfg.lm
        p = next(model.parameters())
        return cls(lm.num_layers, batch, lm.num_heads, lm.head_dim, max_len, device or p.device, dtype or p.dtype)

    def layers(self, rows: int | None = None, start: int | None = None) -> list:
        """One callable per layer for `MoTDecoder.forward(caches=...)`, covering the first `rows` rows
        (all by default): it stores the new tokens at column `start` (default: right after the
        context) and returns every column up to the last new one."""
        rows = self.batch if rows is None else rows
        return [_Span(self, i, rows, start) for i in range(len(self.k))]

    def layers_at(self, column: torch.Tensor) -> list:
        """One callable per layer storing one token per row at `column` ((1,) long, on the device) and
        returning every column of every row."""
        return [_Column(self, i, column) for i in range(len(self.k))]

    def past_meta(self, rows: int | None = None) -> TokenMeta:
        """Metadata of the context (the committed columns) of the first `rows` rows."""
        return TokenMeta(*(t[:rows, : self.length] for t in self.meta.fields()))

    def column_meta(self, rows: int | None = None) -> TokenMeta:
        """Metadata of every column of the first `rows` rows: context, reserved tokens, padding."""
        return TokenMeta(*(t[:rows] for t in self.meta.fields()))

    def new_meta(self, n: int, mode: Mode, segment: int, sample: torch.Tensor, start: int | None = None) -> TokenMeta:
        """Metadata of n new tokens per row of `sample` (B,), forming one segment at columns
        [start, start + n) (default: right after the context)."""
        B, device = sample.shape[0], self.meta.sample.device
        start = self.length if start is None else start
        col = lambda v: v.view(B, 1).expand(B, n).contiguous()  # noqa: E731
        order = torch.arange(start, start + n, device=device).expand(B, n).contiguous()
        return TokenMeta(col(sample.to(device)), torch.full((B, n), segment, device=device), torch.full((B, n), int(mode), device=device), order)

    def reserve(self, meta: TokenMeta) -> None:
        """Write the metadata of tokens to come at their columns (`meta.order`) without committing them."""
        start, n = int(meta.order[0, 0]), meta.sample.shape[1]
        if start + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start + n} tokens > max_len {self.max_len}")
        for dst, src in zip(self.meta.fields(), meta.fields()):
            if dst is not self.meta.order:  # order is the column index, fixed at construction
                dst[: src.shape[0], start : start + n] = src

    def commit(self, meta: TokenMeta) -> None:
        """Keep the tokens of the last forward (whose metadata is `meta`, right after the context) as context."""
        self.reserve(meta)
        self.length += meta.sample.shape[1]


class _Span:
    """Layer `i` of the cache for a forward of host-known size: write at [start, start + n)."""

    def __init__(self, cache: KVCache, i: int, rows: int, start: int | None):
        self.cache, self.i, self.rows, self.start = cache, i, rows, start

    def __call__(self, k_new: torch.Tensor, v_new: torch.Tensor):
        c, n = self.cache, k_new.shape[2]
        start = c.length if self.start is None else self.start
        end = start + n
        if end > c.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {c.max_len}")
        k, v = c.k[self.i], c.v[self.i]
        k[: self.rows, :, start:end] = k_new
        v[: self.rows, :, start:end] = v_new
        return k[: self.rows, :, :end], v[: self.rows, :, :end]


class _Column:
    """Layer `i` of the cache for one token per row at a device-side column."""

    def __init__(self, cache: KVCache, i: int, column: torch.Tensor):
        self.cache, self.i, self.column = cache, i, column

    def __call__(self, k_new: torch.Tensor, v_new: torch.Tensor):
        k, v = self.cache.k[self.i], self.cache.v[self.i]  # (B, H, max_len, Dh)
        k.index_copy_(2, self.column, k_new)
        v.index_copy_(2, self.column, v_new)
        return k, v
