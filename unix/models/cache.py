"""A preallocated KV cache, shared by report decoding and image sampling.

Keys/values of every layer live in one buffer (layers, B, H, max_len, Dh) with the attention
metadata of each cached token. A forward writes its new keys/values in place at columns
[length, length + n) and attends to the views [:length + n]: no concatenation, no copy per token.
`commit(n)` makes them part of the context; a forward that is not committed (every denoising step)
leaves the context as it was, and the next one simply overwrites the same scratch columns.
"""

from __future__ import annotations

import torch

from unix.models.attention import PAD_SAMPLE, Mode, TokenMeta


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        # Zeros, not empty: masked columns still enter the product with the attention weights,
        # and uninitialised memory may hold NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        full = lambda value: torch.full((batch, max_len), value, dtype=torch.long, device=device)  # noqa: E731
        self.meta = TokenMeta(full(PAD_SAMPLE), full(0), full(int(Mode.FULL)), torch.arange(max_len, device=device).expand(batch, max_len).contiguous())
        self.length = 0
        self.max_len = max_len
        self.rows = slice(None)  # which batch rows the next forward covers

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, device=None, dtype=None) -> "KVCache":
        lm = model.cfg.lm
        p = next(model.parameters())
        return cls(lm.num_layers, batch, lm.num_heads, lm.head_dim, max_len, device or p.device, dtype or p.dtype)

    def layers(self) -> list:
        """One callable per layer for `MoTDecoder.forward(caches=...)`."""
        return [self._layer_fn(i) for i in range(self.k.shape[0])]

    def _layer_fn(self, i: int):
        def store_and_read(k_new: torch.Tensor, v_new: torch.Tensor):
            n = k_new.shape[2]
            end = self.length + n
            if end > self.max_len:
                raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
            self.k[i, self.rows, :, self.length:end] = k_new
            self.v[i, self.rows, :, self.length:end] = v_new
            return self.k[i, self.rows, :, :end], self.v[i, self.rows, :, :end]

        return store_and_read

    def past_meta(self) -> TokenMeta:
        return TokenMeta(*(t[self.rows, : self.length] for t in self.meta.fields()))

    def new_meta(self, n: int, mode: Mode, segment: int, sample: torch.Tensor | None = None) -> TokenMeta:
        """Metadata of n new tokens per covered row, forming one segment placed after the context."""
        rows = self.meta.sample[self.rows]
        B, device = rows.shape[0], rows.device
        if sample is None:
            sample = torch.arange(B, device=device)
        col = lambda v: v.view(B, 1).expand(B, n).contiguous()  # noqa: E731
        order = torch.arange(self.length, self.length + n, device=device).expand(B, n).contiguous()
        return TokenMeta(col(sample.to(device)), torch.full((B, n), segment, device=device), torch.full((B, n), int(mode), device=device), order)

    def commit(self, meta: TokenMeta) -> None:
        """Keep the tokens of the last forward (whose metadata is `meta`) as context."""
        n = meta.sample.shape[1]
        for dst, src in zip(self.meta.fields(), meta.fields()):
            if dst is self.meta.order:
                continue  # order is the column index, fixed at construction
            dst[self.rows, self.length : self.length + n] = src
        self.length += n
