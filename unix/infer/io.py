"""Reading X-rays (PNG 8/16-bit, JPG, DICOM) and input lists; writing outputs atomically.

Resize policy for the understanding branch (one, everywhere): letterbox to a square with white
padding, then resize to the ViT's input size — what the reference evaluation does.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from unix.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
LIST_SUFFIXES = {".csv", ".jsonl"}


def read_image(path: str | Path) -> np.ndarray:
    """A grayscale image as float32 (H, W) in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                return arr / (65535.0 if arr.max() > 255 else 255.0)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # alpha dropped, colour averaged
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError:
        raise UserError(f"{path}: reading DICOM needs pydicom (pip install 'unix[eval]')") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = apply_voi_lut(ds.pixel_array, ds).astype(np.float32)  # windowing from the file's VOI LUT / window tags
    except Exception as e:
        raise UserError(f"{path}: not a readable DICOM image ({e})") from None
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1 stores bright = low values
    return arr


def letterbox(image: np.ndarray, size: int, fill: float = 1.0) -> np.ndarray:
    """Pad to a centred square with `fill` (white), then resize to size x size (bicubic)."""
    h, w = image.shape
    side = max(h, w)
    canvas = np.full((side, side), fill, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    resized = Image.fromarray(canvas, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Files, folders (their images, sorted) and CSV/JSONL lists (column `path`, optional `id`)
    -> (id, path) pairs. Ids default to the file name without suffix."""
    items: list[tuple[str, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [(f.stem, str(f)) for f in files]
        elif p.suffix.lower() in LIST_SUFFIXES:
            for i, row in enumerate(read_table(p)):
                if not row.get("path"):
                    raise UserError(f"{p}: row {i + 1} has no 'path'")
                path = Path(row["path"])
                path = path if path.is_absolute() else p.parent / path
                items.append((str(row.get("id") or path.stem), str(path)))
        else:
            items.append((p.stem, str(p)))  # a missing file is reported on its own row later
    return items


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV (header) or JSONL file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: line {n} is not JSON ({e.msg})") from None
            return rows
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file next to `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """JSONL or CSV by suffix, atomically."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import io

        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows)
        atomic_write(path, buf.getvalue())
    else:
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
