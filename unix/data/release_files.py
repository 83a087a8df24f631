"""The UniX authors' evaluation files, read as they are (reference/unix-compat.md 5.2, 5.3, 6.1).

- **test file** (`test_data.json`): a JSON list of `{"messages": [{"role": "user", "content":
  "<image>instruction"}, {"role": "assistant", "content": reference}], "images": [relative path]}`.
  The authors' worker deletes `<image>` from the instruction and keeps the rest as it is.
- **report CSV** (what their understanding run writes): `Image Path`, `Report Impression` (the
  generated report), `Ground Truth`.
- **generation-prompt CSV** (`generations_with_metadata.csv`, CheXGenBench's LLaVA-Rad test CSV):
  `annotated_prompt`, `synthetic_filename`, and where present `path` (the real image, relative to
  the MIMIC-CXR-JPG root), `id` and `chexpert_labels` (a Python dict literal).

An item's id is the image file name without its suffix (the MIMIC dicom id): it does not depend on
where the images live, so a report CSV written with any image prefix joins the test file.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from unix.errors import UserError

IMAGE_TAG = "<image>"
REPORT_CSV_COLUMNS = ("Image Path", "Report Impression", "Ground Truth")
PROMPT_COLUMN, FILENAME_COLUMN = "annotated_prompt", "synthetic_filename"
NAN = re.compile(r"\bnan\b")  # pandas writes missing labels as a bare nan, which literal_eval refuses


@dataclass(frozen=True)
class TestItem:
    id: str  # image file name without suffix (the dicom id)
    image: str  # path relative to the MIMIC-CXR-JPG root, as the file gives it
    instruction: str  # the user turn without `<image>`, otherwise untouched
    reference: str


@dataclass(frozen=True)
class PromptItem:
    id: str  # output file name without suffix
    prompt: str
    filename: str  # output file name (".png" added when it has no image suffix, as the authors do)
    real_path: str | None = None  # the real image of this prompt, relative to the MIMIC root
    labels: dict = field(default_factory=dict, compare=False)  # CheXpert name -> value, from `chexpert_labels`


def item_id(image_path: str) -> str:
    return PurePosixPath(str(image_path).replace("\\", "/")).stem


def _load_json(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None


def _turn(messages, role: str, path: Path, n: int) -> str:
    texts = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
    if not texts or not isinstance(texts[0], str):
        raise UserError(f"{path}: entry {n} has no {role} message")
    return texts[0]  # the authors take the first message of each role


def read_test_file(path: str | Path, limit: int | None = None) -> list[TestItem]:
    """The authors' understanding test file, in file order (`limit`: the first N entries)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{messages, images}} entries")
    items, seen = [], {}
    for n, entry in enumerate(data[:limit] if limit else data, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("messages"), list):
            raise UserError(f"{path}: entry {n} has no `messages` list")
        images = entry.get("images")
        if not isinstance(images, list) or not images or not isinstance(images[0], str):
            raise UserError(f"{path}: entry {n} has no `images` path")
        user = _turn(entry["messages"], "user", path, n)
        item = TestItem(item_id(images[0]), images[0], user.replace(IMAGE_TAG, ""), _turn(entry["messages"], "assistant", path, n))
        if item.id in seen:
            raise UserError(f"{path}: entries {seen[item.id]} and {n} share the image id {item.id!r}")
        seen[item.id] = n
        items.append(item)
    if not items:
        raise UserError(f"{path}: no entries")
    return items


def _csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None


def is_report_csv(path: str | Path) -> bool:
    """True for a CSV whose header holds the authors' report columns."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return all(c in header for c in REPORT_CSV_COLUMNS)


def is_test_file(path: str | Path) -> bool:
    """True for a .json file (the authors' test file format; other JSON is refused when read)."""
    return Path(path).suffix.lower() == ".json"


def read_report_csv(path: str | Path) -> list[dict]:
    """The authors' generated-report CSV as rows {id, path, report, reference}. An empty cell stays
    "" (pandas would read it as the text "nan"); callers decide how to score it."""
    path = Path(path)
    header, rows = _csv_rows(path)
    missing = [c for c in REPORT_CSV_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (the authors' report CSV has {', '.join(REPORT_CSV_COLUMNS)})")
    out = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        image = (row.get("Image Path") or "").strip()
        if not image:
            raise UserError(f"{path}: line {n} has no `Image Path`")
        out.append({"id": item_id(image), "path": image, "report": row.get("Report Impression") or "",
                    "reference": row.get("Ground Truth") or ""})
    return out


def parse_labels(text: str, where: str) -> dict:
    """`chexpert_labels` cells: a Python dict literal such as {'Atelectasis': 1.0, 'Edema': nan}."""
    if not text or not text.strip():
        return {}
    try:
        value = ast.literal_eval(NAN.sub("None", text))
    except (ValueError, SyntaxError):
        raise UserError(f"{where}: `chexpert_labels` is not a dict literal: {text[:60]!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: `chexpert_labels` is not a dict: {text[:60]!r}")
    return {str(k): (None if v is None else float(v)) for k, v in value.items()}


def read_generation_prompts(path: str | Path, limit: int | None = None) -> list[PromptItem]:
    """The authors' generation-prompt CSV, in file order (`limit`: the first N rows)."""
    path = Path(path)
    header, rows = _csv_rows(path)
    if PROMPT_COLUMN not in header:
        raise UserError(f"{path}: no `{PROMPT_COLUMN}` column (the authors' generation-prompt CSV)")
    items, seen = [], {}
    for n, row in enumerate(rows[:limit] if limit else rows, 2):
        prompt = row.get(PROMPT_COLUMN) or ""
        if not prompt.strip():
            raise UserError(f"{path}: line {n} has an empty `{PROMPT_COLUMN}`")
        name = (row.get(FILENAME_COLUMN) or "").strip() or f"SyntheticImg_{row.get('id') or n - 2}.png"
        if not name.lower().endswith((".png", ".jpg", ".jpeg")):
            name += ".png"
        if "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"{path}: line {n}: `{FILENAME_COLUMN}` {name!r} must be a plain file name")
        item = PromptItem(PurePosixPath(name).stem, prompt, name, (row.get("path") or "").strip() or None,
                          parse_labels(row.get("chexpert_labels") or "", f"{path}: line {n}"))
        if item.id in seen:
            raise UserError(f"{path}: lines {seen[item.id]} and {n} both write {name!r}")
        seen[item.id] = n
        items.append(item)
    if not items:
        raise UserError(f"{path}: no rows")
    return items
