"""MIMIC-CXR-JPG -> training shards: the per-study work, the shard plan, resuming, the summary.

Shard k of a split holds the images of that split's studies k*S .. (k+1)*S - 1 (S = shard_studies,
studies in (subject, study) order), so what a shard holds is fixed before any file is read: the
output does not depend on the number of workers, and an interrupted run redoes only the shards
without a completion record. State lives in `<out>/.ingest/`: plan.json (options + a digest of the
study list) and one `{split}-{k:05d}.json` per finished shard (its counts); a shard's parquet file
is written before its record, both atomically. A shard whose studies all fail has a record and no
parquet file.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unix.data.mimic import (EXAMPLES_PER_REASON, Drops, ReportSource, Study, findings_and_impression, image_path,
                              load_image, plan_studies, report_path)
from unix.data.mimic_clean import CLEANING_VERSION, clean_report
from unix.data.mimic_rewrite import make_rewriter
from unix.data.phantom import encode_png
from unix.data.shards import READ_BATCH_ROWS, SHARD_NAME, SPLIT_ORDER, image_report_schema
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.errors import UserError

STATE_DIR, PLAN_FILE, SUMMARY_FILE = ".ingest", "plan.json", "summary.json"
POOL_CHUNKSIZE = 4  # studies per task sent to a worker: amortises the pickling, keeps the bar smooth


@dataclass(frozen=True)
class Options:
    """Everything that changes what the shards hold (a resumed run must use the same)."""

    views: tuple[str, ...] | None = ("PA", "AP")  # ViewPosition values kept; None = all
    image_size: int = 512  # longer side in pixels (never upscaled)
    shard_studies: int = 500  # studies per shard (~1.1 frontal images each in MIMIC)
    limit: int | None = None  # only the first N studies of each split
    rewrite_cmd: str | None = None
    rewrite_model: str | None = None

    def record(self) -> dict:
        return {**asdict(self), "views": list(self.views) if self.views else None, "cleaning_version": CLEANING_VERSION}


@dataclass
class Outcome:
    """What one study gives: rows, and the images dropped with why."""

    rows: list[dict] = field(default_factory=list)
    drops: list[tuple[str, int, str]] = field(default_factory=list)  # (reason, images, example)
    notes: Counter = field(default_factory=Counter)  # cleaning rules that fired


# --------------------------------------------------------------------------- one study (in a worker)

_worker: dict = {}


def init_worker(root: str, reports: str, image_size: int, rewrite_cmd: str | None, rewrite_model: str | None) -> None:
    _worker.update(root=Path(root), reports=ReportSource(reports), size=image_size,
                   rewrite=make_rewriter(rewrite_cmd, rewrite_model))


def _report(study: Study) -> tuple[str | None, Counter, tuple[str, str] | None]:
    """(cleaned report, notes, None) or (None, notes, (drop reason, example))."""
    where = report_path(study.subject_id, study.study_id)
    try:
        text = _worker["reports"].read(study.subject_id, study.study_id)
    except (OSError, UnicodeDecodeError) as e:
        return None, Counter(), ("unreadable_report", f"{where}: {e}")
    if text is None:
        return None, Counter(), ("no_report", f"{where}: no such file")
    try:
        findings, impression = findings_and_impression(text)
        if not findings.strip():
            reason = "impression_only" if impression.strip() else "no_findings_or_impression"
            return None, Counter(), (reason, f"{where}: no FINDINGS section")
        report, notes = clean_report(findings, impression)
    except Exception as e:  # one odd report must not stop a 200k-study run; it is listed instead
        return None, Counter(), ("report_error", f"{where}: {type(e).__name__}: {e}")
    if report is None:
        return None, notes, ("empty_after_cleaning", f"{where}: nothing left of FINDINGS")
    if _worker["rewrite"] is not None:
        try:
            report = _worker["rewrite"](report)
        except Exception as e:  # RewriteError, or the user's model failing on this input
            return None, notes, ("rewrite_failed", f"{where}: {e}")
    return report, notes, None


def process_study(study: Study) -> Outcome:
    out = Outcome()
    report, out.notes, dropped = _report(study)
    if dropped is not None:
        out.drops.append((dropped[0], len(study.images), dropped[1]))
        return out
    labels = [math.nan if v is None else v for v in (study.labels or (None,) * len(CHEXPERT_FINDINGS))]
    for dicom, view in study.images:
        rel = image_path(study.subject_id, study.study_id, dicom)
        try:
            pixels, original = load_image(_worker["root"] / rel, _worker["size"])
        except FileNotFoundError:
            out.drops.append(("missing_image", 1, f"{rel}: no such file"))
            continue
        except Exception as e:  # a truncated or corrupt JPEG: counted, listed, skipped
            out.drops.append(("unreadable_image", 1, f"{rel}: {type(e).__name__}: {e}"))
            continue
        attributes = {"subject_id": study.subject_id, "study_id": study.study_id, "dicom_id": dicom, "view": view,
                      "source": rel, "report_source": report_path(study.subject_id, study.study_id),
                      "original_size": list(original), "labels_missing": study.labels is None,
                      "cleaning": dict(sorted(out.notes.items())), "rewritten": _worker["rewrite"] is not None}
        out.rows.append({"id": dicom, "split": study.split, "image": encode_png(pixels), "report": report,
                         **dict(zip(CHEXPERT_FINDINGS, labels)), "attributes": json.dumps(attributes),
                         "width": pixels.shape[1], "height": pixels.shape[0]})
    return out


# --------------------------------------------------------------------------- plan and state

def atomic_write(path: Path, data: bytes | str) -> None:
    # Imported here, in the parent only: importing unix.infer loads diffusers (seconds per worker).
    from unix.infer.io import atomic_write as write

    write(path, data)


@dataclass(frozen=True)
class Chunk:
    split: str
    k: int
    studies: tuple[Study, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.k:05d}"


def make_chunks(plan: dict[str, list[Study]], shard_studies: int) -> list[Chunk]:
    return [Chunk(split, k // shard_studies, tuple(plan[split][k:k + shard_studies]))
            for split in SPLIT_ORDER for k in range(0, len(plan[split]), shard_studies)]


def plan_record(options: Options, plan: dict[str, list[Study]], drops: Drops) -> dict:
    digest = hashlib.sha256()
    for split in SPLIT_ORDER:
        for study in plan[split]:
            digest.update(repr(study).encode())  # ids, views and labels: what a shard is made of
    return {"options": options.record(), "studies_digest": digest.hexdigest(),
            "studies": {split: len(plan[split]) for split in SPLIT_ORDER},
            "planned_drops": {split: dict(c) for split, c in drops.counts.items()}, "examples": dict(drops.examples)}


def _clear(out: Path) -> None:
    """Remove what this command writes (and any shard: stale shards must not mix in)."""
    for p in out.iterdir():
        if SHARD_NAME.match(p.name) or p.name == SUMMARY_FILE:
            p.unlink()
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _differences(old: dict, new: dict) -> str:
    changed = [f"{k} {old['options'].get(k)!r} -> {v!r}" for k, v in new["options"].items() if old["options"].get(k) != v]
    if old.get("studies_digest") != new["studies_digest"]:
        changed.append("the input tables list other studies")
    return "; ".join(changed)


def prepare_out(out: Path, record: dict, overwrite: bool) -> None:
    """Resume when `out` holds an ingest with the same options and studies; else start (refused
    without `overwrite` when `out` holds anything)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    state = out / STATE_DIR / PLAN_FILE
    if overwrite and out.is_dir():
        _clear(out)
    elif state.is_file():
        old = json.loads(state.read_text())
        if old.get("options") == record["options"] and old.get("studies_digest") == record["studies_digest"]:
            return
        raise UserError(f"--out {out} holds an ingest made differently ({_differences(old, record)}); "
                        "rerun with the same options to resume it, or pass --overwrite to start again")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no MIMIC ingest; pass --overwrite to replace its shards")
    atomic_write(state, json.dumps(record, indent=1) + "\n")


def is_done(out: Path, chunk: Chunk) -> bool:
    """The chunk has its completion record, and its shard file when the record names one."""
    path = out / STATE_DIR / f"{chunk.name}.json"
    if not path.is_file():
        return False
    shard = json.loads(path.read_text()).get("shard")
    return shard is None or (out / shard).is_file()


def write_part(out: Path, chunk: Chunk, outcomes: list[Outcome]) -> None:
    """The chunk's parquet shard (when it has rows), then its completion record."""
    rows = [row for o in outcomes for row in o.rows]
    shard = out / f"{chunk.name}.parquet"
    if rows:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=image_report_schema(CHEXPERT_FINDINGS)), sink,
                       row_group_size=READ_BATCH_ROWS)
        atomic_write(shard, sink.getvalue().to_pybytes())
    else:
        shard.unlink(missing_ok=True)
    drops, notes = Drops(), Counter()
    for o in outcomes:
        notes.update(o.notes)
        for reason, n, example in o.drops:
            drops.add(chunk.split, reason, n, example)
    record = {"rows": len(rows), "studies": sum(bool(o.rows) for o in outcomes),
              "labels_missing": sum(bool(o.rows) and s.labels is None for o, s in zip(outcomes, chunk.studies)),
              "dropped": dict(drops.counts[chunk.split]), "examples": dict(drops.examples), "cleaning": dict(notes),
              "shard": shard.name if rows else None}
    atomic_write(out / STATE_DIR / f"{chunk.name}.json", json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the run

def _results(studies: list[Study], workers: int, initargs: tuple):
    """Outcomes in study order, whatever the number of workers."""
    if workers == 1:
        init_worker(*initargs)
        yield from map(process_study, studies)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=initargs) as pool:
        yield from pool.imap(process_study, studies, chunksize=POOL_CHUNKSIZE)


def check_reports(source: ReportSource, studies: list[Study], n: int = 20) -> None:
    """A wrong --reports would drop every study as no_report: refuse it when none of the first `n` has one."""
    sample = studies[:n]
    if sample and all(source.read(s.subject_id, s.study_id) is None for s in sample):
        raise UserError(f"--reports {source.location}: none of the first {len(sample)} studies has a report "
                        f"(e.g. {report_path(sample[0].subject_id, sample[0].study_id)}); point it at the unpacked "
                        "mimic-cxr-reports (the folder holding files/) or at mimic-cxr-reports.zip")


def summarize(out: Path, record: dict, chunks: list[Chunk], root: Path, reports: Path) -> dict:
    splits = {split: {"rows": 0, "studies": 0, "labels_missing": 0, "dropped": Counter(record["planned_drops"].get(split, {}))}
              for split in SPLIT_ORDER}
    examples = {k: list(v) for k, v in record["examples"].items()}
    cleaning, shards = Counter(), []
    for chunk in chunks:
        part = json.loads((out / STATE_DIR / f"{chunk.name}.json").read_text())
        s = splits[chunk.split]
        s["rows"] += part["rows"]
        s["studies"] += part["studies"]
        s["labels_missing"] += part["labels_missing"]
        s["dropped"].update(part["dropped"])
        cleaning.update(part["cleaning"])
        shards += [part["shard"]] if part["shard"] else []
        for reason, items in part["examples"].items():
            examples[reason] = (examples.get(reason, []) + items)[:EXAMPLES_PER_REASON]
    total = Counter()
    for s in splits.values():
        total.update(s["dropped"])
        s["dropped"] = dict(sorted(s["dropped"].items()))
    unsplit = record["planned_drops"].get("unsplit", {})
    total.update(unsplit)
    return {"command": "unix data mimic", "root": str(root), "reports": str(reports), "options": record["options"],
            "rows": sum(s["rows"] for s in splits.values()), "splits": splits, "unsplit_dropped": unsplit,
            "dropped_total": dict(sorted(total.items())), "examples": dict(sorted(examples.items())),
            "cleaning": dict(sorted(cleaning.items())), "shards": shards}


def ingest(root: Path, reports: Path, out: Path, options: Options, workers: int = 1, overwrite: bool = False,
           progress: bool = True) -> tuple[dict, bool]:
    """Run (or resume) the ingest; returns the summary (also saved as summary.json) and whether
    there was anything left to do."""
    from tqdm import tqdm

    make_rewriter(options.rewrite_cmd, options.rewrite_model)  # a bad hook fails here, not in a worker
    plan, drops = plan_studies(root, options.views, options.limit)
    check_reports(ReportSource(reports), [s for split in SPLIT_ORDER for s in plan[split]])
    record = plan_record(options, plan, drops)
    prepare_out(out, record, overwrite)
    chunks = make_chunks(plan, options.shard_studies)
    pending = [c for c in chunks if not is_done(out, c)]
    if not pending and (out / SUMMARY_FILE).is_file():
        return json.loads((out / SUMMARY_FILE).read_text()), False
    studies = [s for c in pending for s in c.studies]
    initargs = (str(root), str(reports), options.image_size, options.rewrite_cmd, options.rewrite_model)
    bar = tqdm(total=len(studies), desc="mimic", unit="study", file=sys.stderr, disable=not progress)
    results = _results(studies, workers, initargs)
    try:
        for chunk in pending:
            outcomes = []
            for _ in chunk.studies:
                outcomes.append(next(results))
                bar.update()
            write_part(out, chunk, outcomes)
    finally:
        results.close()  # stops the pool at once on an interrupt
        bar.close()
    summary = summarize(out, record, chunks, root, reports)
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary, True
