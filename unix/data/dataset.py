"""Training data: a seeded, resumable, rank-sharded stream of shard rows, packed to a token budget.

Order of an epoch: the shards in a seeded permutation and inside each shard its rows in a seeded
permutation, all concatenated into one global order that does not depend on the number of ranks;
rank r of W reads positions start + r, start + r + W, ... of it. Only one shard is decoded at a
time. Every rank's position is part of every checkpoint, so a resumed run continues with exactly
the rows an uninterrupted run would have seen; on another number of ranks it continues from the
first position some rank had not read yet.

A row that cannot become an example (an undecodable image, a missing report, a shard pyarrow cannot
read) is skipped, named in a warning and counted; past `max_bad_rows` such rows the run stops,
naming the last. Skipping is deterministic, so a resumed run skips the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unix.data.shards import shard_paths
from unix.errors import UserError
from unix.infer.io import letterbox

log = logging.getLogger(__name__)
T = TypeVar("T")
# Unreadable rows one process skips before it stops. A few broken images in a large ingest are
# expected; hundreds mean a broken shard or a wrong column, which deserve a person's look.
MAX_BAD_ROWS = 100


READ_ERRORS = (OSError, ValueError, pa.ArrowException)  # what pyarrow raises for a damaged file


class BadRow(ValueError):
    """A row that cannot become a training example; the message says why."""


def _row_count(path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except READ_ERRORS as e:
        raise UserError(f"data.shards: {path} is not a readable parquet file ({e}); remove or rewrite it") from None


class RowStream:
    def __init__(self, folder: str, split: str, seed: int, rank: int = 0, world: int = 1, max_bad_rows: int = MAX_BAD_ROWS):
        try:
            self.paths = shard_paths(folder, split)
        except FileNotFoundError:
            raise UserError(f"data.shards: no shard folder {folder!r}") from None
        if not self.paths:
            raise UserError(f"data.shards: {folder} holds no '{split}-*.parquet' shards")
        self.counts = [_row_count(p) for p in self.paths]
        self.n_rows = sum(self.counts)
        if self.n_rows < world:
            raise UserError(f"data.shards: {self.n_rows} rows cannot feed {world} ranks")
        self.seed, self.rank, self.world, self.max_bad_rows = seed, rank, world, max_bad_rows
        self.epoch, self.start, self.index = 0, 0, 0  # this rank read `index` rows since global position `start`
        self.key: tuple[int, int] | None = None  # (shard, row) of the row `next()` returned last
        self.bad: set[tuple[int, int]] = set()  # (shard, row) of every row found unreadable
        self.skipped = 0  # rows passed over by this process since it started (metrics)
        self._order: tuple[list[int], list[int]] | None = None  # the epoch's (shard, row) at each global position
        self._table: tuple[int | None, list[dict] | None] = (None, None)  # (shard number, its rows; None = unreadable)

    def _epoch_order(self) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        shards, rows = [], []
        for s in torch.randperm(len(self.paths), generator=g).tolist():
            perm = torch.randperm(self.counts[s], generator=g).tolist()
            shards += [s] * len(perm)
            rows += perm
        return shards, rows

    def position(self) -> int:
        """The global position of this rank's next row in its epoch's order."""
        return self.start + self.rank + self.world * self.index

    def next(self) -> dict:
        """This rank's next row (rows of an unreadable shard are skipped and counted)."""
        while True:
            if self._order is None:
                self._order = self._epoch_order()
            while self.position() >= self.n_rows:
                self.epoch, self.start, self.index = self.epoch + 1, 0, 0
                self._order = self._epoch_order()
            p = self.position()
            s, r = self._order[0][p], self._order[1][p]
            self.index += 1
            self.key = (s, r)
            if self._table[0] != s:
                self._table = (s, self._read(s))
            if self._table[1] is not None:
                return self._table[1][r]
            self.skip("its shard cannot be read")

    def _read(self, s: int) -> list[dict] | None:
        try:
            return pq.read_table(self.paths[s]).to_pylist()
        except READ_ERRORS as e:
            log.warning("data: %s cannot be read (%s): its rows are skipped", self.paths[s], e)
            return None

    def where(self) -> str:
        s, r = self.key
        return f"{self.paths[s]} row {r}"

    def skip(self, reason: str) -> None:
        """Count the row `next()` returned last as unreadable; stop once more than `max_bad_rows` are."""
        new = self.key not in self.bad
        self.bad.add(self.key)
        self.skipped += 1
        if len(self.bad) > self.max_bad_rows:
            raise UserError(f"data: {self.where()}: {reason}; that makes {len(self.bad)} unreadable rows, more than "
                            f"data.max_bad_rows={self.max_bad_rows}: repair or remove the shard, or raise data.max_bad_rows")
        if new and self._table[1] is not None:  # an unreadable shard was named once, when it failed
            log.warning("data: %s: %s; skipped (%d unreadable rows so far)", self.where(), reason, len(self.bad))

    def next_item(self, make: Callable[[dict], T]) -> T:
        """make(row) of the next row it accepts; a row for which it raises BadRow is skipped and counted."""
        while True:
            row = self.next()
            try:
                return make(row)
            except BadRow as e:
                self.skip(str(e))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "index": self.index, "bad": sorted(self.bad)}

    def load_state_dict(self, states: list[dict]) -> None:
        """Every rank's saved state, by rank. The same number of ranks continue exactly where they
        stopped; another number continues from the first position some rank had not read yet, so
        rows that faster ranks read past it are read again (at most about one step's worth)."""
        self.bad = {(int(s), int(r)) for state in states for s, r in state["bad"]}
        if len(states) == self.world:
            state = states[self.rank]
            self.epoch, self.start, self.index = int(state["epoch"]), int(state["start"]), int(state["index"])
        else:
            W = len(states)
            ends = [(int(st["epoch"]), int(st["start"]) + r + W * int(st["index"])) for r, st in enumerate(states)]
            self.epoch = min(e for e, _ in ends)
            self.start, self.index = min(p for e, p in ends if e == self.epoch), 0
        self._order = None


def decode_gray(png: bytes, size: int, fill: float) -> torch.Tensor:
    """Image bytes (PNG in our shards; any format the project's reader `unix.infer.io.read_image`
    reads, 16-bit by its real range) -> (1, size, size) float in [0, 1], letterboxed. Raises BadRow
    for bytes that do not decode to an image."""
    from unix.infer.io import decode_image

    if not isinstance(png, (bytes, bytearray)):
        raise BadRow("no image bytes")
    try:
        arr = decode_image(png, "image")
    except (UserError, TypeError) as e:  # TypeError: the cell is not bytes
        raise BadRow(f"image does not decode ({e})") from None
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

    def __init__(self, stream: RowStream, make_item: Callable[[dict], Item], token_budget: int, max_samples: int):
        self.stream, self.make_item = stream, make_item
        self.budget, self.max_samples = token_budget, max_samples
        self.pending: Item | None = None

    def next_batch(self) -> list[Item]:
        items, used = [], 0
        while len(items) < self.max_samples:
            item = self.pending or self.stream.next_item(self.make_item)
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

    def load_state_dict(self, states: list[dict]) -> None:
        self.stream.load_state_dict(states)
        self.pending = None
