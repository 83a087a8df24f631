"""Training faults: damaged data is skipped, named and counted (or stops the run naming it), and a
resumed run passes over exactly the rows an uninterrupted one did. Every hostile file is made here."""

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unix.cli import main
from unix.errors import UserError
from unix.train.config import load_train_config
from unix.train.trainer import Trainer, run

STAGE1 = Path(__file__).resolve().parents[1] / "configs" / "train" / "phantom_stage1.yaml"
WORDS = ["effusion", "clear", "lungs", "small", "left", "right", "heart", "normal", "size", "no", "pneumothorax"]


def png(rng: np.random.Generator, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_rows: int = 40, per_shard: int = 20, seed: int = 0, bad: dict | None = None) -> Path:
    """Tiny train shards (random images, random short reports); `bad` maps a row number to what it
    holds instead: "garbage" bytes, a "truncated" PNG, "no image", "no report"."""
    from unix.data.shards import ShardWriter, image_report_schema

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, "train", image_report_schema([]), shard_size=per_shard) as w:
        for i in range(n_rows):
            image, report = png(rng), "FINDINGS: " + " ".join(rng.choice(WORDS, 8)) + ". IMPRESSION: none."
            kind = (bad or {}).get(i)
            if kind == "garbage":
                image = b"\x89PNG not really"
            elif kind == "truncated":
                image = image[: len(image) // 2]
            elif kind == "no image":
                image = None
            elif kind == "no report":
                report = None
            w.write({"id": f"r{i:03d}", "split": "train", "image": image, "report": report, "attributes": "{}",
                     "width": 48, "height": 48})
    return folder


def train_cfg(data: Path, out: Path, *extra: str):
    # a constant lr: a run stopped early (fewer steps=) then has the schedule of the full run
    base = [f"data.shards={data}", f"out={out}", "steps=4", "save_every=2", "optim.warmup_steps=1",
            "optim.schedule=constant", "data.token_budget=700", "log_every=1"]
    return load_train_config(STAGE1, base + list(extra))


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# rows 3 and 7 of the first shard, 5 and 11 (= rows 25, 31) of the second
BAD = {3: "garbage", 7: "truncated", 25: "no image", 31: "no report"}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("bad") / "data", bad=BAD)


def test_bad_rows_are_skipped_named_counted_and_skipped_alike_on_resume(bad_data, tmp_path, caplog):
    """Eight steps of ~7 rows pass the 40-row epoch: every bad row is met, named by file and row,
    counted in metrics.jsonl, and a run stopped at step 4 and resumed skips the same rows."""
    with caplog.at_level(logging.WARNING, logger="unix.data.dataset"):
        trainer = Trainer(train_cfg(bad_data, tmp_path / "a", "steps=8", "save_every=4"))
        full = trainer.fit()
    named = set(re.findall(r"(train-0000\d\.parquet) row (\d+)", caplog.text))
    assert named == {("train-00000.parquet", "3"), ("train-00000.parquet", "7"), ("train-00001.parquet", "5"),
                     ("train-00001.parquet", "11")}
    for reason in ("image does not decode", "no image bytes", "no report text"):
        assert reason in caplog.text
    assert trainer.stream.bad == {(0, 3), (0, 7), (1, 5), (1, 11)}
    assert sum(h["skipped_rows"] for h in full) == trainer.stream.skipped >= 4
    assert [m["skipped_rows"] for m in metric_lines(tmp_path / "a")] == [h["skipped_rows"] for h in full]
    first = run(train_cfg(bad_data, tmp_path / "b", "steps=4", "save_every=4"))
    rest = run(train_cfg(bad_data, tmp_path / "b", "steps=8", "save_every=4"))
    assert [(h["loss"], h["skipped_rows"]) for h in first + rest] == [(h["loss"], h["skipped_rows"]) for h in full]


def test_too_many_bad_rows_stop_with_one_line_naming_the_row(bad_data, tmp_path, capsys):
    args = [f"data.shards={bad_data}", f"out={tmp_path / 'x'}", "steps=8", "data.token_budget=700", "data.max_bad_rows=1"]
    assert main(["train", str(STAGE1), *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unix: error:")]
    assert len(errors) == 1 and "Traceback" not in err  # (the rest is the progress bar)
    assert re.search(r"train-0000[01]\.parquet row \d+: .*2 unreadable rows, more than data\.max_bad_rows=1", errors[0]), err
    # the limit is per process and counts distinct rows: a second epoch does not count them again
    run(train_cfg(bad_data, tmp_path / "y", "steps=12", "save_every=12", "data.max_bad_rows=4"))


def test_corrupt_shard_is_named_and_skipped_or_stops_the_run(tmp_path, caplog):
    """A shard whose footer reads but whose pages do not: named once, its rows skipped (20 here);
    under the default limit of 100 a run on it goes on, at a limit below its size it stops."""
    import pyarrow.parquet as pq

    data = write_shards(tmp_path / "data")
    shard = data / "train-00001.parquet"
    page = pq.ParquetFile(shard).metadata.row_group(0).column(2).data_page_offset  # the image column
    raw = bytearray(shard.read_bytes())
    raw[page:page + 32] = b"\xff" * 32
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        history = run(train_cfg(data, tmp_path / "a", "steps=8", "save_every=8"))
    assert f"{shard} cannot be read" in caplog.text and "its rows are skipped" in caplog.text
    assert sum(h["skipped_rows"] for h in history) >= 20 and all(np.isfinite(h["loss"]) for h in history)
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))} row \d+: its shard cannot be read.*max_bad_rows=10"):
        run(train_cfg(data, tmp_path / "b", "steps=8", "data.max_bad_rows=10"))
    # a shard whose footer is unreadable is refused before any compute, by name
    (data / "train-00002.parquet").write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(UserError, match=r"train-00002\.parquet is not a readable parquet file"):
        Trainer(train_cfg(data, tmp_path / "c"))


def test_stage0_trainers_skip_bad_rows(bad_data, tmp_path):
    assert main(["train-vae", "--shards", str(bad_data), "--out", str(tmp_path / "vae"), "--steps", "3", "--image-size", "32",
                 "--batch-size", "16"]) == 0
    assert main(["train-vision", "--shards", str(bad_data), "--out", str(tmp_path / "vis"), "--preset", "tiny", "--steps", "3",
                 "--batch-size", "16"]) == 0
    assert json.loads((tmp_path / "vis" / "vision.json").read_text())["steps"] == 3
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "vae" / "vae.json").read_text())["l1"]))
