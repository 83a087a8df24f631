"""Issue 28, silently wrong pixels: every file is built here with known values, and read back by the
project's one reader (`unix.infer.io.read_image`) and by the training loader, the MIMIC ingest and
`eval images --protocol exact` that use it. Expected values come from the formats' own rules
(PNG sBIT, DICOM PS3.3 C.11.1 and C.11.2.1.2.1, ITU-R 601 luma), computed in the test."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from unix.errors import UserError
from unix.infer.io import decode_image, expand_inputs, letterbox, read_image

pydicom = pytest.importorskip("pydicom")


def png16(path, values: np.ndarray, sbit: int | None = None) -> None:
    """A 16-bit gray PNG of `values`, with an sBIT chunk declaring `sbit` significant bits."""
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    data = buf.getvalue()
    if sbit is not None:
        body = bytes([sbit])
        chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
        data = data[:33] + chunk + data[33:]  # after the signature (8) and IHDR (25)
    path.write_bytes(data)


RAMP12 = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))  # 12-bit data, max 4032
RAMP12[0, 0] = 4095


def test_16_bit_png_full_range_and_12_bit_data(tmp_path):
    full = np.tile(np.linspace(0, 65535, 32).round(), (3, 1))
    png16(tmp_path / "full.png", full)
    np.testing.assert_allclose(read_image(tmp_path / "full.png"), full / 65535, atol=1e-6)
    png16(tmp_path / "twelve.png", RAMP12)  # no sBIT: the smallest detector depth holding 4095 is 12 bits
    np.testing.assert_allclose(read_image(tmp_path / "twelve.png"), RAMP12 / 4095, atol=1e-6)
    ten = np.array([[0, 512, 1000]])
    png16(tmp_path / "ten.png", ten)
    np.testing.assert_allclose(read_image(tmp_path / "ten.png"), ten / 1023, atol=1e-6)


def test_16_bit_png_sbit_declares_the_depth(tmp_path):
    png16(tmp_path / "raw.png", RAMP12, sbit=12)  # values stored as they are
    np.testing.assert_allclose(read_image(tmp_path / "raw.png"), RAMP12 / 4095, atol=1e-6)
    scaled = RAMP12.astype(np.int64) << 4  # the PNG specification's way: scaled up to 16 bits
    png16(tmp_path / "scaled.png", scaled, sbit=12)
    np.testing.assert_allclose(read_image(tmp_path / "scaled.png"), scaled / 65535, atol=1e-6)
    dim = np.array([[0, 100, 200]])  # 14 bits declared: a dim image stays dim
    png16(tmp_path / "dim.png", dim, sbit=14)
    np.testing.assert_allclose(read_image(tmp_path / "dim.png"), dim / 16383, atol=1e-7)


def test_float_tiff_by_its_range(tmp_path):
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_allclose(read_image(tmp_path / "unit.tif"), unit, atol=1e-7)
    counts = (unit * 3000 + 500).astype(np.float32)  # not in [0, 1]: its own minimum to maximum
    Image.fromarray(counts, mode="F").save(tmp_path / "counts.tif")
    np.testing.assert_allclose(read_image(tmp_path / "counts.tif"), (counts - 500) / 3000, atol=1e-6)
    bad = unit.copy()
    bad[1, 1] = np.nan
    Image.fromarray(bad, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match=r"nan\.tif: .*not finite"):
        read_image(tmp_path / "nan.tif")


def dicom(path, pixels: np.ndarray, preamble: bool = True, **tags) -> None:
    """A DICOM file of `pixels` (uint16 gray (H, W), (F, H, W) frames, or uint8 RGB (H, W, 3))."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    rgb = pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = 8 if rgb else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, (8 if rgb else 12), (7 if rgb else 11)
    ds.SamplesPerPixel, ds.PixelRepresentation = (3 if rgb else 1), 0
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if rgb else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=preamble)


STORED = np.tile(np.arange(0, 4000, 250, dtype=np.uint16), (3, 1))  # (3, 16) stored values


def window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), scaled to [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_dicom_modality_then_window(tmp_path):
    dicom(tmp_path / "ct.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=2001)
    got = read_image(tmp_path / "ct.dcm")
    expected = window(STORED * 2.0 - 1024, 1500, 2001)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert 0 < expected.mean() < 1 and not np.allclose(got, window(STORED.astype(float), 1500, 2001), atol=0.05)  # the order matters


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.LUTDescriptor = [16, 0, 16]  # 16 entries from stored value 0, 16-bit output
    lut.LUTData = ((np.arange(16) ** 2) * 100).astype("<u2").tobytes()  # 0 .. 22,500, not linear (OW)
    ramp = np.arange(16, dtype=np.uint16)[None].repeat(2, 0)
    dicom(tmp_path / "lut.dcm", ramp, VOILUTSequence=Sequence([lut]))
    np.testing.assert_allclose(read_image(tmp_path / "lut.dcm"), (ramp.astype(float) ** 2) / 225, atol=1e-6)


def test_dicom_without_window_uses_the_data_range_and_monochrome1_inverts(tmp_path):
    dicom(tmp_path / "plain.dcm", STORED, RescaleSlope=1, RescaleIntercept=0)
    dicom(tmp_path / "inverted.dcm", STORED, PhotometricInterpretation="MONOCHROME1")
    plain = read_image(tmp_path / "plain.dcm")
    np.testing.assert_allclose(plain, STORED / STORED.max(), atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "inverted.dcm"), 1 - plain, atol=1e-6)


def test_dicom_multi_frame_gives_the_first_frame_with_a_warning(tmp_path, caplog):
    frames = np.stack([STORED, STORED[:, ::-1], STORED // 2])
    dicom(tmp_path / "cine.dcm", frames)
    with caplog.at_level(logging.WARNING, logger="unix"):
        got = read_image(tmp_path / "cine.dcm")
    np.testing.assert_allclose(got, STORED / STORED.max(), atol=1e-6)
    assert "cine.dcm: 3 frames; reading the first" in caplog.text


def test_dicom_rgb_becomes_gray_like_pil(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    dicom(tmp_path / "colour.dcm", rgb)
    got = read_image(tmp_path / "colour.dcm")
    np.testing.assert_allclose(got, rgb @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-6)
    Image.fromarray(rgb).save(tmp_path / "colour.png")  # PIL's convert("L") rounds to 8 bits
    np.testing.assert_allclose(got, read_image(tmp_path / "colour.png"), atol=1 / 255 + 1e-6)


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_dicom_is_found_by_its_preamble_not_its_name(tmp_path):
    dicom(tmp_path / "IM0001", STORED)  # PACS exports often have no suffix
    np.testing.assert_allclose(read_image(tmp_path / "IM0001"), STORED / STORED.max(), atol=1e-6)
    (tmp_path / "notes").write_text("x" * 200)
    assert [it.id for it in expand_inputs([str(tmp_path)])] == ["IM0001"]  # a folder's DICOMs are found by content
    dicom(tmp_path / "bare.dcm", STORED, preamble=False)  # no preamble: known by its name
    np.testing.assert_allclose(read_image(tmp_path / "bare.dcm"), STORED / STORED.max(), atol=1e-6)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(UserError, match=r"junk\.dcm: not a readable DICOM image"):
        read_image(tmp_path / "junk.dcm")
    (tmp_path / "junk.bin").write_bytes(b"nothing here")
    with pytest.raises(UserError, match=r"junk\.bin: not a readable image"):
        read_image(tmp_path / "junk.bin")


def test_letterbox_of_a_long_strip_is_bounded():
    strip = np.linspace(0, 1, 100_000, dtype=np.float32)[None]  # 1 x 100,000: the canvas is capped
    out = letterbox(strip, 32)
    assert out.shape == (32, 32) and np.isfinite(out).all()


# --- the other readers agree with read_image -----------------------------------------------------

def test_training_loader_reads_16_bit_pngs_by_their_range(tmp_path):
    from unix.data.dataset import decode_gray

    png16(tmp_path / "twelve.png", RAMP12)
    loaded = decode_gray((tmp_path / "twelve.png").read_bytes(), 32, fill=0.0)[0].numpy()
    np.testing.assert_allclose(loaded, letterbox(read_image(tmp_path / "twelve.png"), 32, 0.0), atol=1e-6)
    assert loaded.max() < 1.0  # not clipped to white, as convert("L") did
    with pytest.raises(ValueError, match="does not decode"):  # BadRow
        decode_gray(b"not an image", 32, fill=1.0)


def test_mimic_ingest_reads_16_bit_pngs_by_their_range(tmp_path):
    from unix.data.mimic import load_image

    png16(tmp_path / "twelve.png", RAMP12)
    pixels, original = load_image(tmp_path / "twelve.png", 512)
    assert original == (64, 4)
    np.testing.assert_array_equal(pixels, np.round(RAMP12 / 4095 * 255).astype(np.uint8))


def test_eval_images_exact_protocol_uses_the_reader_release_keeps_the_authors(tmp_path):
    from unix.eval.features import load_image

    png16(tmp_path / "twelve.png", RAMP12)
    exact = load_image(tmp_path / "twelve.png", 8, reader="unix")
    expected = np.asarray(Image.fromarray(np.round(read_image(tmp_path / "twelve.png") * 255).astype(np.uint8)).resize((8, 8), Image.BILINEAR))
    assert exact.shape == (3, 8, 8) and np.array_equal(exact[0].numpy(), expected) and np.array_equal(exact[2].numpy(), expected)
    released = load_image(tmp_path / "twelve.png", 8, released_round_trip=True)
    assert released.float().mean() > exact.float().mean() + 100  # the authors' convert("RGB") clips 16-bit to white


def test_decode_image_names_what_it_reads():
    with pytest.raises(UserError, match="shard 3 row 7: not a readable image"):
        decode_image(b"\x89PNG\r\n\x1a\n broken", "shard 3 row 7")
