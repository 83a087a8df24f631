"""Reading X-rays (PNG 8/16-bit, JPG, DICOM) and input lists; writing outputs atomically.

Resize policies for the understanding branch (`fit_image`): "letterbox" (ours, and training's)
pads to a white square, then resizes to the ViT's input size; "thumbnail" is the authors'
evaluation (shrink to fit, never upscale, centre on white). A weights folder says which it wants
(unix/weights/inference.py).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
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


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The authors' evaluation resize (eval/base/worker.py::_load_image, reference/unix-compat.md 5.4):
    the 8-bit image shrunk with LANCZOS to fit size x size (aspect kept, never upscaled), pasted
    centred on a white square. They do it on RGBA copies of the gray image, which gives the same
    values as doing it on the gray image (tested)."""
    gray = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    gray.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 255)
    canvas.paste(gray, ((size - gray.width) // 2, (size - gray.height) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0


RESIZERS = {"letterbox": letterbox, "thumbnail": thumbnail}


def fit_image(image: np.ndarray, size: int, policy: str = "letterbox") -> np.ndarray:
    """A gray image (H, W) in [0, 1] -> the ViT's square input (size, size) by `policy`."""
    return RESIZERS[policy](image, size)


@dataclass(frozen=True)
class InputItem:
    id: str
    path: str
    instruction: str | None = None  # this image's own instruction, where its list gives one
    reference: str | None = None  # the reference report, where its list gives one (the authors' test file)


def _list_path(raw: str, lst: Path, root: Path | None) -> str:
    path = Path(raw)
    return str(path if path.is_absolute() else (root or lst.parent) / path)


def expand_inputs(inputs: list[str], image_root: str | Path | None = None) -> list[InputItem]:
    """Files, folders (their images, sorted), CSV/JSONL lists (column `path`, optional `id` and
    `instruction`) and the authors' test JSON -> items. Ids default to the file name without
    suffix. Relative paths in a list are read under `image_root`, else the list's folder."""
    from unix.data.release_files import is_test_file, read_test_file

    root = Path(image_root) if image_root else None
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [InputItem(f.stem, str(f)) for f in files]
        elif is_test_file(p):
            items += [InputItem(t.id, _list_path(t.image, p, root), t.instruction, t.reference) for t in read_test_file(p)]
        elif p.suffix.lower() in LIST_SUFFIXES:
            for i, row in enumerate(read_table(p)):
                if not row.get("path"):
                    raise UserError(f"{p}: row {i + 1} has no 'path'")
                path = _list_path(str(row["path"]), p, root)
                instruction = row.get("instruction")
                if instruction is not None and not isinstance(instruction, str):
                    raise UserError(f"{p}: row {i + 1}: 'instruction' is not text")
                instruction = instruction if instruction and instruction.strip() else None  # an empty cell: the default
                items.append(InputItem(str(row.get("id") or Path(path).stem), path, instruction))
        else:
            items.append(InputItem(p.stem, str(p)))  # a missing file is reported on its own row later
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
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output should get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


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
