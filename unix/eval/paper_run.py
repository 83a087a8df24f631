"""The generation half of `unix eval paper`: every report and every image, resumable.

Reports go to `OUT/reports.jsonl`, one line per finished test item, appended after each batch;
images to `OUT/images_{size}/{synthetic_filename}`, each written atomically. A rerun reads what is
there and computes only the rest. `OUT/run.json` records what the outputs were made with; a rerun
with other weights or settings stops instead of mixing outputs of two models.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from unix.data.release_files import PromptItem, TestItem
from unix.errors import UserError
from unix.infer.io import atomic_write, png_bytes, read_image

log = logging.getLogger(__name__)

REPORTS_FILE = "reports.jsonl"
RUN_FILE = "run.json"


@dataclass
class RunContext:
    out: Path
    mimic: Path
    batch_size: int
    quiet: bool = False


def check_run_record(out: Path, record: dict, overwrite: bool) -> None:
    """Refuse to continue a run folder made with other weights/settings (unless --overwrite)."""
    path = out / RUN_FILE
    record = json.loads(json.dumps(record))  # as it reads back (tuples become lists)
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        changed = sorted(k for k in record if k in old and old[k] != record[k])
        if changed:
            raise UserError(f"{path}: this folder holds outputs made with other {', '.join(changed)} "
                            f"({', '.join(f'{k}={old[k]!r}' for k in changed)}); use another --out or --overwrite")
    atomic_write(path, json.dumps(record, indent=2) + "\n")


def read_done_reports(path: Path) -> dict[str, dict]:
    """Finished report rows by id. A torn last line (an interrupted append) is dropped and the
    file rewritten without it, so the next append starts on a clean line."""
    if not path.is_file():
        return {}
    done, good_lines, torn = {}, [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if isinstance(row, dict) and "id" in row:
            done[row["id"]] = row
            good_lines.append(line)
    if torn:
        log.warning("%s: dropped an unfinished line from an interrupted run", path)
        atomic_write(path, "".join(line + "\n" for line in good_lines))
    return done


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def write_reports(ctx: RunContext, items: list[TestItem], get_pipe, settings) -> dict[str, dict]:
    """A report for every test item not yet in reports.jsonl; returns every row by id."""
    path = ctx.out / REPORTS_FILE
    done = read_done_reports(path)
    todo = [it for it in items if it.id not in done or done[it.id].get("error")]
    if not todo:
        return done
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="reports", unit="img", disable=ctx.quiet)
    batch: list[TestItem] = []

    def flush():
        paths = [str(ctx.mimic / it.image) for it in batch]
        texts = get_pipe().reports(paths, settings, instructions=[it.instruction for it in batch])
        rows = [{"id": it.id, "image": it.image, "instruction": it.instruction, "report": text, "reference": it.reference}
                for it, text in zip(batch, texts)]
        _append(path, rows)
        done.update((r["id"], r) for r in rows)
        bar.update(len(batch))
        batch.clear()

    for it in todo:
        try:
            read_image(ctx.mimic / it.image)
        except UserError as e:  # one unreadable image is reported and the rest go on
            row = {"id": it.id, "image": it.image, "instruction": it.instruction, "report": "", "reference": it.reference, "error": str(e)}
            _append(path, [row])
            done[it.id] = row
            bar.update(1)
            continue
        batch.append(it)
        if len(batch) == ctx.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return done


def image_folder(out: Path, size: int) -> Path:
    return out / f"images_{size}"


def write_images(ctx: RunContext, items: list[PromptItem], seeds: dict[str, int], get_pipe, size: int) -> list[Path]:
    """An image for every prompt whose file is not there yet; returns every image path, in order."""
    folder = image_folder(ctx.out, size)
    paths = [folder / it.filename for it in items]
    todo = [(it, p) for it, p in zip(items, paths) if not p.is_file()]
    if todo:
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"images {size}px", unit="img", disable=ctx.quiet)
        for i in range(0, len(todo), ctx.batch_size):
            chunk = todo[i : i + ctx.batch_size]
            pipe = get_pipe()
            settings = pipe.image_settings(size=size)
            images = pipe.images([it.prompt for it, _ in chunk], [seeds[it.id] for it, _ in chunk], settings)
            for (_, path), image in zip(chunk, images):
                atomic_write(path, png_bytes(image))
            bar.update(len(chunk))
        bar.close()
    return paths


def write_authors_csvs(out: Path, reports: dict[str, dict], items: list[TestItem], prompts: list[PromptItem]) -> None:
    """The same outputs in the authors' file formats, so their own scripts can score them too."""
    import csv
    import io

    if items:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["Image Path", "Report Impression", "Ground Truth"])
        for it in items:
            if it.id in reports:
                w.writerow([it.image, reports[it.id].get("report", ""), it.reference])
        atomic_write(out / "understanding_results.csv", buf.getvalue())
    if prompts:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["synthetic_filename", "annotated_prompt"])
        for it in prompts:
            w.writerow([it.filename, it.prompt])
        atomic_write(out / "generations_with_metadata.csv", buf.getvalue())
