"""MIMIC-CXR-JPG inputs: the three CSV tables, the free-text reports, the images, report sections.

PhysioNet layout (MIMIC-CXR-JPG 2.0.0 / 2.1.0; both releases keep the `mimic-cxr-2.0.0-*` table
names), under the `--root` folder:
  files/p10/p10000032/s50414267/<dicom_id>.jpg   one folder per study; p + first 2 digits of the subject
  mimic-cxr-2.0.0-split.csv.gz     dicom_id, study_id, subject_id, split (train | validate | test)
  mimic-cxr-2.0.0-metadata.csv.gz  dicom_id, subject_id, study_id, PerformedProcedureStepDescription,
                                   ViewPosition, Rows, Columns, StudyDate, StudyTime, ... (one row per image)
  mimic-cxr-2.0.0-chexpert.csv.gz  subject_id, study_id, the 14 CheXpert observations (1.0, 0.0, -1.0, blank)
The reports come from MIMIC-CXR (not -JPG): `files/p10/p10000032/s50414267.txt`, one per study, in a
folder or inside `mimic-cxr-reports.zip`. Uncompressed `.csv` tables are read too.
"""

from __future__ import annotations

import csv
import gzip
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.errors import UserError

SPLIT_TABLE, METADATA_TABLE, CHEXPERT_TABLE = "mimic-cxr-2.0.0-split", "mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert"
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}  # MIMIC's name -> our shard prefix
FRONTAL_VIEWS = ("PA", "AP")
EXAMPLES_PER_REASON = 5  # the summary lists this many items per drop reason


@dataclass(frozen=True)
class Study:
    """One study to ingest: its images of the selected views (sorted by dicom id) and its labels."""

    split: str  # train | val | test
    subject_id: str
    study_id: str
    images: tuple[tuple[str, str], ...]  # (dicom_id, ViewPosition)
    labels: tuple[float | None, ...] | None  # CHEXPERT_FINDINGS order, None = blank; None = no label row


@dataclass
class Drops:
    """Images dropped, per split and reason, with the first few examples of each reason."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, split: str, reason: str, n: int, example: str) -> None:
        self.counts[split][reason] += n
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(example)


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_path(subject_id: str, study_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


# --------------------------------------------------------------------------- tables

def find_table(root: Path, stem: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        if (root / (stem + suffix)).is_file():
            return root / (stem + suffix)
    raise UserError(f"--root {root}: no {stem}.csv.gz (or .csv); is it the MIMIC-CXR-JPG folder?")


def read_table(path: Path, required: tuple[str, ...]) -> Iterator[dict]:
    """The rows of a (gzip'ed) CSV as dicts, streamed (the metadata table has 377k rows); the named
    columns must be present."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
            yield from reader
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV table ({e})") from None


def _label(value: str, where: str) -> float | None:
    if value.strip() == "":
        return None
    try:
        x = float(value)
    except ValueError:
        x = 2.0  # refused just below
    if x not in (1.0, 0.0, -1.0):
        raise UserError(f"{where}: CheXpert value {value!r} is not 1, 0, -1 or blank")
    return x


def read_labels(path: Path) -> dict[tuple[str, str], tuple[float | None, ...]]:
    rows = read_table(path, ("subject_id", "study_id", *CHEXPERT_FINDINGS))
    return {(r["subject_id"], r["study_id"]): tuple(_label(r[name], f"{path}: study {r['study_id']}") for name in CHEXPERT_FINDINGS)
            for r in rows}


def plan_studies(root: Path, views: tuple[str, ...] | None, limit: int | None = None) -> tuple[dict[str, list[Study]], Drops]:
    """The studies to ingest per split, in (subject, study) order, each with its images of `views`
    (None = every view); and the images dropped before any file is opened (no split row, no
    metadata row, a view not kept). `limit`: only the first N studies of each split."""
    split_path, meta_path = find_table(root, SPLIT_TABLE), find_table(root, METADATA_TABLE)
    labels = read_labels(find_table(root, CHEXPERT_TABLE))
    split_of: dict[str, tuple[str, str, str]] = {}
    for r in read_table(split_path, SPLIT_COLUMNS):
        if r["split"] not in SPLIT_NAMES:
            raise UserError(f"{split_path}: split {r['split']!r} of {r['dicom_id']} is not train, validate or test")
        split_of[r["dicom_id"]] = (SPLIT_NAMES[r["split"]], r["subject_id"], r["study_id"])
    drops = Drops()
    grouped: dict[tuple[str, str, str], list[tuple[str, str]]] = defaultdict(list)
    seen = set()
    for r in read_table(meta_path, METADATA_COLUMNS):
        dicom = r["dicom_id"]
        seen.add(dicom)
        where = image_path(r["subject_id"], r["study_id"], dicom)
        if dicom not in split_of:
            drops.add("unsplit", "missing_split_row", 1, f"{where}: not in {split_path.name}")
            continue
        grouped[split_of[dicom]].append((dicom, (r["ViewPosition"] or "").strip().upper()))
    for dicom, (split, subject, study) in split_of.items():
        if dicom not in seen:
            drops.add(split, "missing_metadata_row", 1, f"{image_path(subject, study, dicom)}: not in {meta_path.name}")
    plan: dict[str, list[Study]] = {name: [] for name in SPLIT_NAMES.values()}
    for split in plan:
        keys = sorted((k for k in grouped if k[0] == split), key=lambda k: (int(k[1]), int(k[2])))
        for _, subject, study in keys[:limit] if limit else keys:
            images = sorted(grouped[(split, subject, study)])
            kept = tuple(im for im in images if views is None or im[1] in views)
            for dicom, view in images:
                if (dicom, view) not in kept:
                    drops.add(split, "view_excluded", 1, f"{image_path(subject, study, dicom)}: view {view or '(blank)'}")
            if kept:
                plan[split].append(Study(split, subject, study, kept, labels.get((subject, study))))
    return plan, drops


# --------------------------------------------------------------------------- reports

class ReportSource:
    """Reads `files/pXX/pSUBJECT/sSTUDY.txt` from a folder (holding `files/`, or `files/` itself) or
    from MIMIC-CXR's `mimic-cxr-reports.zip`."""

    def __init__(self, location: str | Path):
        self.location = Path(location)
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if self.location.is_file() and self.location.suffix.lower() == ".zip":
            self.folder = None
            self._open_zip()
        elif self.location.is_dir() and (self.location / "files").is_dir():
            self.folder = self.location
        elif self.location.is_dir() and self.location.name == "files":
            self.folder = self.location.parent
        elif self.location.is_dir():
            raise UserError(f"--reports {self.location}: no files/ folder of pXX/pSUBJECT/sSTUDY.txt reports")
        else:
            raise UserError(f"--reports {self.location}: neither a folder nor a .zip file")

    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.location)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"--reports {self.location}: not a readable zip file ({e})") from None
        for name in self._zip.namelist():  # index by the layout's tail: the zip's top folder may vary
            m = re.search(r"(files/p\d\d/p\d+/s\d+\.txt)$", name)
            if m:
                self._members[m[1]] = name
        if not self._members:
            raise UserError(f"--reports {self.location}: no files/pXX/pSUBJECT/sSTUDY.txt inside")

    def read(self, subject_id: str, study_id: str) -> str | None:
        """The report text, or None when the study has no report file."""
        rel = report_path(subject_id, study_id)
        if self.folder is not None:
            path = self.folder / rel
            return path.read_text(encoding="utf-8") if path.is_file() else None
        name = self._members.get(rel)
        return None if name is None else self._zip.read(name).decode("utf-8")


# A section header: upper-case words at the start of a line, then a colon ("FINDINGS:", "WET READ:").
HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,()/&'-]*[A-Z)])[ \t]*:", re.MULTILINE)
FINAL_REPORT = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)
# Which headers feed which part of our report; every other section is dropped. A combined
# "FINDINGS AND IMPRESSION" section is findings (there is then no separate impression).
SECTION_ALIASES = {
    "FINDINGS": "findings", "FINDING": "findings", "FINDINGS AND IMPRESSION": "findings",
    "FINDINGS/IMPRESSION": "findings", "IMPRESSION AND FINDINGS": "findings",
    "IMPRESSION": "impression", "IMPRESSIONS": "impression", "CONCLUSION": "impression", "CONCLUSIONS": "impression",
}


def split_sections(text: str) -> list[tuple[str, str]]:
    """(HEADER, body) of every section after the FINAL REPORT line (the whole text when there is
    none: a WET READ above it is a preliminary read). Text before the first header is left out."""
    m = FINAL_REPORT.search(text)
    if m:
        text = text[m.end():]
    heads = list(HEADER.finditer(text))
    return [(h[1].strip(), text[h.end(): nxt.start() if nxt else len(text)].strip())
            for h, nxt in zip(heads, heads[1:] + [None])]


def findings_and_impression(text: str) -> tuple[str, str]:
    """The FINDINGS and IMPRESSION bodies ("" when absent); repeated sections are joined."""
    parts = {"findings": [], "impression": []}
    for header, body in split_sections(text):
        kind = SECTION_ALIASES.get(re.sub(r"\s+", " ", header))
        if kind and body:
            parts[kind].append(body)
    return "\n".join(parts["findings"]), "\n".join(parts["impression"])


# --------------------------------------------------------------------------- images

def load_image(path: Path, longer_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An 8-bit grayscale image whose longer side is at most `longer_side` (aspect kept, never
    upscaled), and the original (width, height). JPEGs are decoded at the smallest DCT scale that
    still covers the target (libjpeg's scaled IDCT, much faster on 2,500 x 3,000 px files), then
    resampled with Lanczos, which Pillow applies antialiased. Other files (16-bit PNG, TIFF, DICOM)
    go through the project's reader, `unix.infer.io.read_image`, so their real range is kept."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                original = im.size  # before draft() decodes it smaller
                return _shrink(im, longer_side, draft=True), original
    except UnidentifiedImageError:
        pass  # DICOM, or not an image at all: the reader says which
    from unix.infer.io import read_image  # imported here: the unix.infer package loads the model code

    gray = Image.fromarray(np.round(read_image(path) * 255).astype(np.uint8), mode="L")
    return _shrink(gray, longer_side), gray.size


def _shrink(im: Image.Image, longer_side: int, draft: bool = False) -> np.ndarray:
    w, h = im.size
    scale = longer_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
    if draft:
        im.draft("L", size)
    im = im.convert("L")
    if im.size != size:
        im = im.resize(size, Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)

