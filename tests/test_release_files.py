"""The authors' evaluation files are read as their own scripts read them."""

import csv
import json

import pytest

from unix.data.release_files import (
    is_report_csv,
    read_generation_prompts,
    read_report_csv,
    read_test_file,
)
from unix.errors import UserError


def _entry(image, instruction, reference):
    return {"messages": [{"content": "<image>" + instruction, "role": "user"}, {"content": reference, "role": "assistant"}],
            "images": [image]}


def test_test_file_keeps_the_instruction_as_the_authors_do(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([
        _entry("files/p10/p10000001/s50000001/aaa-1.jpg", "Review this X-ray and provide detailed FINDINGS.", "FINDINGS: Clear."),
        {"images": ["files/p10/p10000002/s50000002/bbb-2.jpg"],  # role order does not matter, the first of each role counts
         "messages": [{"role": "assistant", "content": "FINDINGS: A. IMPRESSION: B."}, {"role": "user", "content": " <image>Describe it. "}]},
    ]))
    items = read_test_file(path)
    assert [it.id for it in items] == ["aaa-1", "bbb-2"]
    assert items[0].instruction == "Review this X-ray and provide detailed FINDINGS."
    assert items[1].instruction == " Describe it. "  # only `<image>` is removed, as the authors' worker does
    assert items[1].reference == "FINDINGS: A. IMPRESSION: B."
    assert read_test_file(path, limit=1) == items[:1]


@pytest.mark.parametrize("content, message", [
    ("{}", "JSON list"),
    ("[{\"messages\": []}]", "no `images`"),
    ("[{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"images\": [\"a.jpg\"]}]", "no assistant message"),
    ("not json", "not a JSON file"),
])
def test_bad_test_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_test_file(path)


def test_duplicate_images_in_the_test_file_are_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([_entry("files/a/x.jpg", "i", "r"), _entry("files/b/x.jpg", "i", "r")]))
    with pytest.raises(UserError, match="entries 1 and 2"):
        read_test_file(path)


def test_report_csv_rows_join_the_test_file_by_image_stem(tmp_path):
    path = tmp_path / "understanding_results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Path", "Report Impression", "Ground Truth"])
        w.writerow(["/data/mimic/files/p10/p10000001/s50000001/aaa-1.jpg", "FINDINGS: Clear.", "FINDINGS: Clear."])
        w.writerow(["./files/p10/p10000002/s50000002/bbb-2.jpg", "", "FINDINGS: A."])  # a failed generation: empty
    assert is_report_csv(path)
    rows = read_report_csv(path)
    assert [r["id"] for r in rows] == ["aaa-1", "bbb-2"]
    assert rows[1]["report"] == "" and rows[1]["reference"] == "FINDINGS: A."
    other = tmp_path / "other.csv"
    other.write_text("id,report\n1,x\n")
    assert not is_report_csv(other)
    with pytest.raises(UserError, match="missing column"):
        read_report_csv(other)


def test_generation_prompts_with_labels_and_file_names(tmp_path):
    path = tmp_path / "gen.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "annotated_prompt", "chexpert_labels", "synthetic_filename"])
        w.writerow(["7", "files/p10/x.jpg", "Small left effusion.", "{'Pleural Effusion': 1.0, 'Edema': nan}", "SyntheticImg_7.png"])
        w.writerow(["8", "", "No acute process.", "", "SyntheticImg_8"])
    items = read_generation_prompts(path)
    assert items[0].labels == {"Pleural Effusion": 1.0, "Edema": None}
    assert items[0].real_path == "files/p10/x.jpg" and items[1].real_path is None
    assert [it.filename for it in items] == ["SyntheticImg_7.png", "SyntheticImg_8.png"]  # .png added, as the authors do
    assert [it.id for it in items] == ["SyntheticImg_7", "SyntheticImg_8"]


@pytest.mark.parametrize("name, message", [("../evil.png", "plain file name"), ("SyntheticImg_1.png", "both write")])
def test_prompt_file_names_cannot_escape_or_collide(tmp_path, name, message):
    path = tmp_path / "gen.csv"
    path.write_text(f"annotated_prompt,synthetic_filename\nA.,SyntheticImg_1.png\nB.,{name}\n")
    with pytest.raises(UserError, match=message):
        read_generation_prompts(path)
