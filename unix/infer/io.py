"""Reading X-rays (PNG, JPG, TIFF, BMP, DICOM) and input lists; writing outputs atomically.

Every format is read by the range it declares, into gray float32 in [0, 1]:
- 8-bit images (PNG, JPG, BMP, TIFF): value / 255; colour becomes gray with PIL's luma
  (`convert("L")`, ITU-R 601), alpha is dropped.
- 16-bit PNG/TIFF: by the bit depth the file declares (a PNG's sBIT chunk), else by the smallest
  common detector depth (8, 10, 12, 14 or 16 bits) that holds the image's maximum, so 12-bit data
  stored in 16 bits is not read nearly black. A PNG whose sBIT says 12 but whose values go past
  4095 holds them scaled to 16 bits, as the PNG specification asks, and is read by 65535.
- Float TIFF: as it is when it lies in [0, 1], else from its own minimum to its maximum.
- DICOM (found by its "DICM" preamble, or a .dcm/.dicom name): the modality transform (Modality
  LUT, or RescaleSlope/Intercept), then the VOI transform (VOI LUT, or the window), the window's
  output range becoming black to white; without a VOI transform, the data's own minimum to maximum
  (what a viewer's automatic window shows). MONOCHROME1 is inverted, colour (RGB, YBR, palette)
  becomes gray with the same luma as PIL, and a multi-frame file gives its first frame (a warning
  says so).

Resize policies for the understanding branch (`fit_image`): "letterbox" (ours, and training's)
pads to a white square, then resizes to the ViT's input size; "thumbnail" is the authors'
evaluation (shrink to fit, never upscale, centre on white). A weights folder says which it wants
(unix/weights/inference.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unix.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = (".dcm", ".dicom")
LIST_SUFFIXES = {".csv", ".jsonl"}
DICOM_MAGIC, DICOM_MAGIC_AT = b"DICM", 128  # DICOM PS3.10 7.1: a 128-byte preamble, then "DICM"
DETECTOR_DEPTHS = (8, 10, 12, 14, 16)  # bit depths X-ray detectors and their exports store
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of PIL's convert("L")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | Path) -> np.ndarray:
    """A grayscale image as float32 (H, W) in [0, 1] (the module docstring says how each format is
    read). A file that cannot be read is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    return decode_image(data, str(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """`read_image` on a file's bytes (`name` is what an error calls it; its suffix may say DICOM)."""
    dicom_name = name.lower().endswith(DICOM_SUFFIXES)
    if data[DICOM_MAGIC_AT : DICOM_MAGIC_AT + 4] == DICOM_MAGIC:
        image = _decode_dicom(data, name)
    else:
        try:
            image = _decode_pil(data, name)
        except UnidentifiedImageError:
            if not dicom_name:  # a DICOM without a preamble is recognised by its name only
                raise UserError(f"{name}: not a readable image (unknown format)") from None
            image = _decode_dicom(data, name)
    if image.ndim != 2 or image.size == 0:
        raise UserError(f"{name}: not a 2-D image (pixel array of shape {image.shape})")
    if not np.isfinite(image).all():
        raise UserError(f"{name}: some pixel values are not finite numbers (NaN or infinity)")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _decode_pil(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in SIXTEEN_BIT_MODES:
                arr = np.asarray(im).astype(np.float64)
                sbit = png_significant_bits(data) if im.format == "PNG" else None
                return arr / integer_range(arr.max(), 16, sbit)
            if im.mode in ("I", "F"):  # 32-bit integers (some TIFFs) or floats
                arr = np.asarray(im).astype(np.float64)
                if not np.isfinite(arr).all():
                    raise UserError(f"{name}: some pixel values are not finite numbers (NaN or infinity)")
                return _own_range(arr) if im.mode == "F" or arr.min() < 0 or arr.max() > 65535 else arr / integer_range(arr.max(), 16)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as e:
        # Pillow says "broken PNG" with SyntaxError and a short file with EOFError or struct.error
        raise UserError(f"{name}: not a readable image ({e.__class__.__name__}: {_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def integer_range(peak: float, container_bits: int, significant_bits: int | None = None) -> float:
    """The value that is white for integer samples of `container_bits` whose maximum is `peak`:
    2^b - 1 for the declared significant bits b when the values fit them (stored as they are), the
    container's when they do not (stored scaled up, PNG 11.3.3.4); without a declaration, the
    smallest detector depth that holds `peak`."""
    if significant_bits and 0 < significant_bits < container_bits:
        return float(2**significant_bits - 1 if peak <= 2**significant_bits - 1 else 2**container_bits - 1)
    bits = next((b for b in DETECTOR_DEPTHS if b <= container_bits and peak <= 2**b - 1), container_bits)
    return float(2**bits - 1)


def _own_range(arr: np.ndarray) -> np.ndarray:
    """Float data in [0, 1] as it is; other data from its minimum (black) to its maximum (white)."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def png_significant_bits(data: bytes) -> int | None:
    """The gray (or largest colour) sample depth a PNG's sBIT chunk declares, None without one.
    Pillow does not read sBIT, so the chunks before the image data are walked here."""
    pos = 8  # after the PNG signature
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data
            return None
        if kind == b"sBIT" and length >= 1:
            colours = 3 if data[25] in (2, 3, 6) else 1  # IHDR colour type: RGB, palette, RGBA; else gray (+ alpha)
            return max(data[pos + 8 : pos + 8 + min(length, colours)])  # the alpha depth is not a sample we read
        pos += 12 + length
    return None


def _decode_dicom(data: bytes, name: str) -> np.ndarray:
    try:
        import pydicom
        from pydicom import uid
        from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
    except ImportError:
        raise UserError(f"{name}: reading DICOM needs pydicom (pip install 'unix[eval]')") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not ds.file_meta.get("TransferSyntaxUID"):  # a bare data set (no file meta): uncompressed, as it was read
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit
                                              else uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
        syntax = ds.file_meta.TransferSyntaxUID
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        try:
            pixels = pixel_array(ds, index=0 if frames > 1 else None)  # only the frame we read; colour converted to RGB
        except Exception as e:
            if syntax.is_compressed and "PixelData" in ds:
                raise UserError(f"{name}: its pixels are compressed as {syntax.name}, which no installed decoder reads "
                                "(pydicom's pixel-data handlers: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)") from e
            raise
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if frames > 1:
            log.warning("%s: %d frames; reading the first", name, frames)
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(pixels, ds)
            return rgb.astype(np.float64) @ np.array(LUMA) / float(np.iinfo(rgb.dtype).max)
        if pixels.ndim == 3:  # RGB (YBR arrives converted)
            return pixels.astype(np.float64) @ np.array(LUMA) / float(2 ** int(ds.get("BitsStored", 8)) - 1)
        values = apply_modality_lut(pixels, ds)
        values, lo, hi = _voi(values, ds)
    except UserError:
        raise
    except Exception as e:  # pydicom raises many kinds for a damaged or unsupported file
        raise UserError(f"{name}: not a readable DICOM image ({e.__class__.__name__}: {_first_line(e)})") from None
    gray = (values - lo) / (hi - lo) if hi > lo else np.zeros(values.shape)
    return 1.0 - gray if photometric == "MONOCHROME1" else gray  # MONOCHROME1 stores bright as low values


def _voi(values: np.ndarray, ds) -> tuple[np.ndarray, float, float]:
    """The VOI transform of modality values (pydicom's rules, a VOI LUT before a window) and the
    range of its output, which becomes black to white; without one, the data's own range."""
    from pydicom.pixels import apply_voi, apply_windowing

    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
        levels = apply_voi(np.arange(first, first + entries), ds)  # every entry of the LUT
        return apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64), float(levels.min()), float(levels.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window's black and white
        return apply_windowing(values, ds), float(lo), float(hi)
    values = values.astype(np.float64)
    return values, float(values.min()), float(values.max())


MAX_CANVAS = 8192  # letterbox's square canvas side at most (X-rays are up to about 4,300 px: never reached)


def letterbox(image: np.ndarray, size: int, fill: float = 1.0) -> np.ndarray:
    """Pad to a centred square with `fill` (white), then resize to size x size (bicubic)."""
    h, w = image.shape
    if max(h, w) > MAX_CANVAS:  # a 1 x 100,000 strip would need a 10^10-pixel canvas: shrink it first
        scale = MAX_CANVAS / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        image = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
    side = max(h, w)
    canvas = np.full((side, side), fill, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    resized = Image.fromarray(canvas, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The authors' evaluation resize (eval/base/worker.py::_load_image, reference/unix-compat.md 5.4):
    the 8-bit image shrunk with LANCZOS to fit size x size (aspect kept, never upscaled), pasted
    centred on a white square. They shrink an RGBA copy of the gray image, and so does this: when
    Pillow reduces a large image before the LANCZOS pass, a 4-band image rounds differently from a
    1-band one (Pillow 12)."""
    gray = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mode="L").convert("RGBA")
    gray.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(gray.convert("RGB"), ((size - gray.width) // 2, (size - gray.height) // 2))  # opaque: alpha is 255
    return np.asarray(canvas, dtype=np.float32)[..., 0] / 255.0


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


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or a DICOM by its preamble whatever its name (PACS exports: IM0001)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path.is_file()
    if not path.is_file() or path.suffix.lower() in LIST_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(DICOM_MAGIC_AT + 4)[DICOM_MAGIC_AT:] == DICOM_MAGIC
    except OSError:
        return False


def _list_path(raw: str, lst: Path, root: Path | None) -> str:
    path = Path(raw)
    return str(path if path.is_absolute() else (root or lst.parent) / path)


def expand_inputs(inputs: list[str], image_root: str | Path | None = None) -> list[InputItem]:
    """Files, folders (their images, sorted; DICOMs also without a suffix), CSV/JSONL lists (column `path`, optional `id` and
    `instruction`) and the authors' test JSON -> items. Ids default to the file name without
    suffix. Relative paths in a list are read under `image_root`, else the list's folder."""
    from unix.data.release_files import is_test_file, read_test_file

    root = Path(image_root) if image_root else None
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if is_image_file(f))
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


NAME_LIMIT = 200  # bytes of an output name's stem: file systems allow 255 for a whole name with its suffix


def check_file_name(name: str, where: str) -> str:
    """`name` when it can name an output file inside the output folder, else a UserError naming
    `where`: no folder separator, no leading dot (`.`, `..`, hidden files), no control character,
    not blank, at most NAME_LIMIT bytes."""
    problem = ("is empty" if not name.strip()
               else "holds a folder separator" if "/" in name or "\\" in name
               else "starts with a dot" if name.startswith(".")
               else "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name)
               else f"is longer than {NAME_LIMIT} bytes" if len(name.encode()) > NAME_LIMIT
               else None)
    if problem:
        raise UserError(f"{where}: id {name!r} {problem}; it names an output file, so it must be a plain file name")
    return name


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
