"""Reading X-rays: 8/16-bit PNG, DICOM (MONOCHROME1 inversion), resize policies, input lists."""

import json

import numpy as np
import pytest
from PIL import Image

from unix.errors import UserError
from unix.infer.io import InputItem, expand_inputs, fit_image, letterbox, read_image


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
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


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


def authors_fit(path, size):
    """The authors' evaluation resize, step by step as eval/base/worker.py::_load_image and
    data/data_utils.py::pil_img2rgb do it (RGBA copy, thumbnail, paste on a transparent white
    square, composite on white), then ToTensor's /255 of one channel."""
    image = Image.open(path).convert("RGBA")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2), image)
    white = Image.new("RGB", canvas.size, (255, 255, 255))
    white.paste(canvas, mask=canvas.split()[3])
    rgb = np.asarray(white, dtype=np.float32) / 255.0
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0]


@pytest.mark.parametrize("wh", [(150, 97), (61, 130), (300, 190), (40, 30)])  # wide, tall, large (PIL reduces first), small
def test_thumbnail_policy_equals_the_authors_resize(tmp_path, wh):
    rng = np.random.default_rng(1)
    w, h = wh
    smooth = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 50, w))
    Image.fromarray((smooth + rng.integers(0, 50, (h, w))).astype(np.uint8)).save(tmp_path / "x.png")
    ours = fit_image(read_image(tmp_path / "x.png"), 64, "thumbnail")
    ref = authors_fit(tmp_path / "x.png", 64)
    assert ours.shape == (64, 64) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    if max(wh) < 64:  # never upscaled: the image sits unchanged in the middle
        top, left = (64 - h) // 2, (64 - w) // 2
        np.testing.assert_array_equal(ours[top : top + h, left : left + w], read_image(tmp_path / "x.png"))
    assert ours[0].min() == 1.0 or ours[:, 0].min() == 1.0  # white bars
    assert not np.array_equal(ours, fit_image(read_image(tmp_path / "x.png"), 64, "letterbox"))


def test_expand_inputs_from_lists_and_folders(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "one.png")
    (tmp_path / "list.csv").write_text("id,path,instruction\nfirst,one.png,Describe the FINDINGS.\nsecond,one.png,\n")
    (tmp_path / "list.jsonl").write_text('{"path": "one.png", "instruction": "Give the IMPRESSION."}\n')
    one = str(tmp_path / "one.png")
    assert expand_inputs([str(tmp_path / "list.csv")]) == [InputItem("first", one, "Describe the FINDINGS."), InputItem("second", one)]
    assert expand_inputs([str(tmp_path / "list.jsonl")]) == [InputItem("one", one, "Give the IMPRESSION.")]
    assert [it.id for it in expand_inputs([str(tmp_path)])] == ["one"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text("path\none.png\n")  # relative to --image-root when given
    assert expand_inputs([str(tmp_path / "sub" / "list.csv")], image_root=tmp_path)[0].path == one
    (tmp_path / "bad.csv").write_text("id\nx\n")
    with pytest.raises(UserError, match="no 'path'"):
        expand_inputs([str(tmp_path / "bad.csv")])


def test_expand_inputs_reads_the_authors_test_file(tmp_path):
    entries = [{"messages": [{"role": "user", "content": "<image>Provide the FINDINGS and IMPRESSION for this chest X-ray."},
                             {"role": "assistant", "content": "FINDINGS: Clear. IMPRESSION: Normal."}],
                "images": ["files/p10/p100/s1/abc-1.jpg"]},
               {"messages": [{"role": "user", "content": "<image>Review this X-ray and provide detailed FINDINGS."},
                             {"role": "assistant", "content": "FINDINGS: Small effusion."}],
                "images": ["files/p11/p110/s2/def-2.jpg"]}]
    (tmp_path / "test_data.json").write_text(json.dumps(entries))
    items = expand_inputs([str(tmp_path / "test_data.json")], image_root="/data/mimic")
    assert [it.id for it in items] == ["abc-1", "def-2"]
    assert items[0].path == "/data/mimic/files/p10/p100/s1/abc-1.jpg"
    assert items[1].instruction == "Review this X-ray and provide detailed FINDINGS."
    assert items[1].reference == "FINDINGS: Small effusion."
    assert expand_inputs([str(tmp_path / "test_data.json")])[0].path == str(tmp_path / "files/p10/p100/s1/abc-1.jpg")


def test_atomic_write_gives_outputs_the_usual_mode_and_leaves_no_temp_file(tmp_path):
    import os

    from unix.infer.io import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
