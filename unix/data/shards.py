"""Parquet shards of (image, report, labels) rows: written atomically, read back row by row.

Layout of a data set folder: `{split}-{k:05d}.parquet` (train-00000.parquet, val-00000.parquet, ...),
each shard at most `shard_size` rows. A shard is written to a hidden temporary file and renamed into
place, so a folder never holds a half-written shard under a real name.

Columns (`image_report_schema`):
  id          string   unique row id
  split       string   train | val | test
  image       binary   PNG bytes (8-bit grayscale)
  report      string   "FINDINGS: ... IMPRESSION: ..."
  <label>     float32  one column per CheXpert observation, named exactly as CheXpert does
                       ("No Finding", "Pleural Effusion", ...): 1 positive, 0 negative, -1 uncertain,
                       NaN = blank (not mentioned)
  attributes  string   JSON object with structured attributes (findings with side/severity/zone, ...)
  width       int32
  height      int32
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<k>\d{5})\.parquet$")
READ_BATCH_ROWS = 256
SPLIT_ORDER = ("train", "val", "test")  # shard_paths lists these first, in this order


def image_report_schema(labels: Iterable[str]) -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("split", pa.string()), pa.field("image", pa.binary()),
              pa.field("report", pa.string())]
    fields += [pa.field(name, pa.float32()) for name in labels]
    fields += [pa.field("attributes", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    return pa.schema(fields)


class ShardWriter:
    """Buffers rows of one split and writes `{split}-{k:05d}.parquet` every `shard_size` rows.

    Use as a context manager: on a clean exit the last partial shard is written; on an exception the
    buffered rows are dropped and no temporary file is left behind."""

    def __init__(self, out_dir: str | Path, split: str, schema: pa.Schema, shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not re.fullmatch(r"[a-z]+", split):
            raise ValueError(f"split must be lowercase letters (it names the files), got {split!r}")
        self.out_dir, self.split, self.schema, self.shard_size = Path(out_dir), split, schema, shard_size
        self.rows: list[dict] = []
        self.paths: list[Path] = []
        self.n_rows = 0

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        path = self.out_dir / f"{self.split}-{len(self.paths):05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            pq.write_table(table, tmp, row_group_size=READ_BATCH_ROWS)
            os.replace(tmp, path)  # atomic on one file system
        finally:
            tmp.unlink(missing_ok=True)
        self.paths.append(path)
        self.n_rows += len(self.rows)
        self.rows = []

    def close(self) -> list[Path]:
        self.flush()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.rows = []


def shard_paths(root: str | Path, split: str | None = None) -> list[Path]:
    """The shards in `root` (optionally of one split): train, val, test, then other splits; then by number."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no shard folder {root}")
    found = [p for p in root.iterdir() if (m := SHARD_NAME.match(p.name)) and (split is None or m["split"] == split)]

    def order(p: Path) -> tuple[int, str, str]:
        name = SHARD_NAME.match(p.name)["split"]
        return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name, p.name)

    return sorted(found, key=order)


def iter_rows(source: str | Path | Iterable[str | Path], split: str | None = None,
              columns: list[str] | None = None) -> Iterator[dict]:
    """Rows as dicts, shard by shard. `source` is a shard folder (then `split` filters it) or shard paths."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        paths = shard_paths(source, split)
    else:
        paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    for path in paths:
        shard = pq.ParquetFile(path)
        for batch in shard.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def count_rows(root: str | Path, split: str | None = None) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(root, split))
