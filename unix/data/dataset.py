"""Training data: a seeded, resumable, rank-sharded stream of shard rows, packed to a token budget.

Order of an epoch: the shards in a seeded permutation, and inside each shard its rows in a seeded
permutation, of which rank r takes every world-th row. Only one shard is decoded at a time. The
stream's position (epoch, index) is part of every checkpoint, so a resumed run continues with
exactly the rows an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from unix.data.shards import shard_paths
from unix.errors import UserError
from unix.infer.io import letterbox


class RowStream:
    def __init__(self, folder: str, split: str, seed: int, rank: int = 0, world: int = 1):
        try:
            self.paths = shard_paths(folder, split)
        except FileNotFoundError:
            raise UserError(f"data.shards: no shard folder {folder!r}") from None
        if not self.paths:
            raise UserError(f"data.shards: {folder} holds no '{split}-*.parquet' shards")
        self.counts = [pq.ParquetFile(p).metadata.num_rows for p in self.paths]
        if sum(self.counts) < world:
            raise UserError(f"data.shards: {sum(self.counts)} rows cannot feed {world} ranks")
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = 0, 0
        self.key: tuple[int, int] | None = None  # (shard, row) of the row `next()` returned last
        self._order: list[tuple[int, int]] | None = None
        self._table = (None, None)  # (shard number, decoded rows)

    def _epoch_order(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = []
        for s in torch.randperm(len(self.paths), generator=g).tolist():
            rows = torch.randperm(self.counts[s], generator=g)[self.rank :: self.world].tolist()
            order += [(s, r) for r in rows]
        return order

    def next(self) -> dict:
        if self._order is None:
            self._order = self._epoch_order()
        while self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        s, r = self._order[self.index]
        self.index += 1
        self.key = (s, r)
        if self._table[0] != s:
            self._table = (s, pq.read_table(self.paths[s]).to_pylist())
        return self._table[1][r]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def decode_gray(png: bytes, size: int, fill: float) -> torch.Tensor:
    """PNG bytes -> (1, size, size) float in [0, 1], letterboxed."""
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(letterbox(arr, size, fill))[None]


@dataclass
class Item:
    """One training example before packing: token ids and the image it needs."""

    prompt: list[int]  # instruction (und) or report (gen) segment ids
    answer: list[int]  # report segment ids (und); empty for gen
    image: torch.Tensor | None  # (1, S, S) in [0, 1]; None when only the latent is needed
    n_tokens: int
    latent: torch.Tensor | None = None  # generation: the image's normalised VAE latent (C, h, w)


class Packer:
    """Draws items from the stream until the next one would pass the token budget."""

    def __init__(self, stream: RowStream, make_item, token_budget: int, max_samples: int):
        self.stream, self.make_item = stream, make_item
        self.budget, self.max_samples = token_budget, max_samples
        self.pending: Item | None = None

    def next_batch(self) -> list[Item]:
        items, used = [], 0
        while len(items) < self.max_samples:
            item = self.pending or self.make_item(self.stream.next())
            self.pending = None
            if item.n_tokens > self.budget:
                raise UserError(f"data.token_budget={self.budget} is smaller than one sample ({item.n_tokens} tokens)")
            if items and used + item.n_tokens > self.budget:
                self.pending = item
                break
            items.append(item)
            used += item.n_tokens
        return items

    def state_dict(self) -> dict:
        # The pending item was drawn but not used: resume one row earlier so it is drawn again.
        state = self.stream.state_dict()
        if self.pending is not None:
            state = {**state, "index": state["index"] - 1}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self.pending = None
