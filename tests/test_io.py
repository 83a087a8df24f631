"""Reading X-rays: 8/16-bit PNG, DICOM (MONOCHROME1 inversion), letterboxing, input lists."""

import numpy as np
import pytest
from PIL import Image

from unix.errors import UserError
from unix.infer.io import expand_inputs, letterbox, read_image


def test_png_8_and_16_bit(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, 0)
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "b.png")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert a.shape == b.shape == (8, 64)
    assert abs(a.max() - 1) < 1e-6 and abs(b.max() - 1) < 1e-6 and np.allclose(a, b, atol=1 / 255)


def write_dicom(path, pixels: np.ndarray, photometric: str):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = photometric
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = np.tile(np.arange(16, dtype=np.uint16) * 200, (4, 1))
    write_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1")
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2[0, 0] == 0 and m2[0, -1] == 1
    np.testing.assert_allclose(m1, 1 - m2)


def test_letterbox_pads_white_and_keeps_aspect():
    img = np.zeros((40, 20), dtype=np.float32)  # tall black image
    out = letterbox(img, 32)
    assert out.shape == (32, 32)
    assert out[16, 0] > 0.99 and out[16, -1] > 0.99  # white bars left and right
    assert out[16, 16] < 0.01  # the image in the middle


def test_bad_files_name_themselves(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(UserError, match="x.png"):
        read_image(tmp_path / "x.png")
    with pytest.raises(UserError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_expand_inputs_from_lists_and_folders(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "one.png")
    (tmp_path / "list.csv").write_text("id,path\nfirst,one.png\n")
    (tmp_path / "list.jsonl").write_text('{"path": "one.png"}\n')
    assert expand_inputs([str(tmp_path / "list.csv")]) == [("first", str(tmp_path / "one.png"))]
    assert expand_inputs([str(tmp_path / "list.jsonl")])[0][0] == "one"
    assert [i for i, _ in expand_inputs([str(tmp_path)])] == ["one"]
    (tmp_path / "bad.csv").write_text("id\nx\n")
    with pytest.raises(UserError, match="no 'path'"):
        expand_inputs([str(tmp_path / "bad.csv")])
