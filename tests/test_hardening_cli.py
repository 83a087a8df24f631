"""Issue 28 through `unix` as a user runs it: writes where they should not, bad numbers, damaged
weights, inputs far from the training images, and the newcomer's items. Every hostile file is
made here; every case ends in a result or one `unix: error:` line, never a traceback."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unix.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "phantom-tiny"
EXAMPLE = ROOT / "examples" / "cardiomegaly.png"
GENERATE = ["generate", "--size", "64", "--steps", "2", "--device", "cpu", "-q"]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *words: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("unix: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """The shipped model in a folder of our own (to damage), without its input statistics."""
    folder = tmp_path_factory.mktemp("weights") / "demo"
    shutil.copytree(DEMO, folder)
    (folder / "input_stats.json").unlink()
    return folder


# --- writes where they should not --------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["../../x", "sub/x", "..", ".x", "a\\b", "tab\there"])
def test_prompt_ids_must_be_plain_file_names(tmp_path, capsys, bad_id):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fine", "prompt": "Normal."}) + "\n" + json.dumps({"id": bad_id, "prompt": "Normal."}) + "\n")
    out = tmp_path / "a" / "out"
    code, _, err = run(GENERATE + ["--prompts-file", prompts, "--out", out], capsys)
    assert code == 2
    assert_one_line(err, "prompts.jsonl: row 2", repr(bad_id))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["prompts.jsonl"]  # nothing written, inside or outside --out


def test_duplicate_output_names_are_refused_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\nA,Normal.\nb,Small effusion.\na,Cardiomegaly.\n")
    code, _, err = run(GENERATE + ["--prompts-file", prompts, "--out", tmp_path / "out"], capsys)
    assert code == 2  # A.png and a.png are one file on a case-insensitive file system
    assert_one_line(err, "prompts.csv: row 3", "'a'", "row 1", "overwrite")
    prompts.write_text("id,prompt\nprompt000,Normal.\n")  # the name of the first prompt given as an argument
    code, _, err = run(GENERATE + ["Effusion.", "--prompts-file", prompts, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "prompt000" in err and not (tmp_path / "out").exists()


def test_outputs_keep_earlier_runs_get_the_usual_modes_and_are_never_overwritten(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "nested"
        assert run(GENERATE + ["Normal chest.", "--out", out], capsys)[0] == 0
        (tmp_path / "p.jsonl").write_text(json.dumps({"id": "second", "prompt": "Small left effusion.", "seed": 7}) + "\n")
        assert run(GENERATE + ["--prompts-file", tmp_path / "p.jsonl", "--out", out], capsys)[0] == 0
        code, _, err = run(GENERATE + ["Cardiomegaly.", "--out", out], capsys)  # prompt000 again
        assert code == 2 and "prompt000.png exists" in err
        assert run(GENERATE + ["Cardiomegaly.", "--out", out, "--overwrite", "--seed", "5"], capsys)[0] == 0
    finally:
        os.umask(old)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["seed"], r["prompt"]) for r in rows] == [("second", 7, "Small left effusion."), ("prompt000", 5, "Cardiomegaly.")]
    for path in [tmp_path / "new", out]:
        assert path.stat().st_mode & 0o777 == 0o755
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path
    (out / "lonely.json").write_text("{}")  # a sidecar name taken is refused too
    (tmp_path / "q.csv").write_text("id,prompt\nlonely,Normal.\n")
    code, _, err = run(GENERATE + ["--prompts-file", tmp_path / "q.csv", "--out", out], capsys)
    assert code == 2 and "lonely.json exists" in err
    assert (out / "lonely.json").read_text() == "{}"
    code, _, err = run(GENERATE + ["Normal.", "--out", out / "manifest.jsonl"], capsys)  # a file, not a folder
    assert code == 2
    assert_one_line(err, "is a file")


def test_report_out_is_never_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.write_text("mine\n")
    code, _, err = run(["report", EXAMPLE, "--out", out, "-q"], capsys)
    assert code == 2 and out.read_text() == "mine\n"
    assert_one_line(err, "r.jsonl exists")


# --- bad numbers -------------------------------------------------------------------------------

BAD_NUMBERS = [
    (["generate", "x", "--guidance", "nan"], "--guidance"),
    (["generate", "x", "--guidance", "inf"], "--guidance"),
    (["generate", "x", "--shift", "nan"], "--shift"),
    (["generate", "x", "--shift", "0"], "--shift"),
    (["generate", "x", "--size", "0"], "--size"),
    (["generate", "x", "--steps", "1"], "--steps"),
    (["generate", "x", "--steps", "-3"], "--steps"),
    (["generate", "x", "--seed", "-1"], "--seed"),
    (["generate", "x", "--seed", str(2**63)], "--seed"),
    (["generate", "x", "y", "--seed", str(2**63 - 1)], "image 2"),
    (["generate", "x", "--guidance-interval", "0.5", "nan"], "--guidance-interval"),
    (["generate", "x", "--guidance-interval", "0.9", "0.1"], "--guidance-interval"),
    (["generate", "x", "--num-per-prompt", "0"], "--num-per-prompt"),
    (["generate", "x", "--batch-size", "0"], "--batch-size"),
    (["report", "x.png", "--temperature", "-1"], "--temperature"),
    (["report", "x.png", "--temperature", "nan"], "--temperature"),
    (["report", "x.png", "--top-p", "0"], "--top-p"),
    (["report", "x.png", "--top-p", "1.5"], "--top-p"),
    (["report", "x.png", "--seed", str(2**64)], "--seed"),
    (["report", "x.png", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "images", "--real", "r", "--fake", "f", "--kid-subsets", "0"], "--kid-subsets"),
    (["eval", "images", "--real", "r", "--fake", "f", "--nearest-k", "0"], "--nearest-k"),
    (["eval", "images", "--real", "r", "--fake", "f", "--shards", "0"], "--shards"),
    (["eval", "images", "--real", "r", "--fake", "f", "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("argv, option", BAD_NUMBERS)
def test_bad_numbers_are_one_line_naming_the_option(tmp_path, capsys, monkeypatch, argv, option):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["abc", "1.5", str(2**63)])
def test_bad_seed_in_a_prompts_file(tmp_path, capsys, seed):
    (tmp_path / "p.csv").write_text(f"id,prompt,seed\na,Normal.,3\nb,Normal.,{seed}\n")
    code, _, err = run(GENERATE + ["--prompts-file", tmp_path / "p.csv", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_line(err, "p.csv: row 2", "seed")


def test_non_finite_sampling_json_and_weights_are_refused(demo_copy, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(demo_copy, bad)
    (bad / "sampling.json").write_text('{"guidance": NaN}')  # Python's json reads NaN
    code, _, err = run(GENERATE + ["Normal.", "--weights", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_line(err, "sampling.json: guidance", "finite")
    (bad / "sampling.json").unlink()
    tensors = load_file(bad / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point() and "norm" not in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, bad / "model.safetensors")
    for argv in (["report", EXAMPLE, "-q"], GENERATE + ["Normal.", "--out", tmp_path / "o"]):
        code, out, err = run(argv + ["--weights", bad], capsys)
        assert code == 2 and out == ""
        assert_one_line(err, str(bad), "NaN")
    assert not (tmp_path / "o").exists()


# --- reports: a batch keeps going, out-of-domain inputs are named ----------------------------------

def test_report_batch_keeps_going_and_says_which_inputs_are_far(demo_copy, tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    from test_hardening_pixels import STORED, dicom

    dicom(tmp_path / "cine.dcm", np.stack([STORED, STORED]))
    dicom(tmp_path / "colour", np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8))  # no suffix
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
    Image.fromarray((np.arange(5000) % 256).astype(np.uint8)[None]).save(tmp_path / "strip.png")
    shutil.copy(EXAMPLE, tmp_path / "phantom.png")
    items = ["phantom.png", "cine.dcm", "colour", "corrupt.png", "dot.png", "strip.png"]
    out = tmp_path / "reports.jsonl"
    code, _, err = run(["report", *(tmp_path / i for i in items), "--out", out, "--max-new-tokens", "4", "-q", "--batch-size", "3"], capsys)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 1 and list(rows) == ["phantom", "cine", "colour", "corrupt", "dot", "strip"]
    assert all(rows[i]["report"] is not None for i in rows if i != "corrupt")
    assert rows["corrupt"]["report"] is None and "corrupt.png: not a readable image" in rows["corrupt"]["error"]
    assert rows["phantom"]["out_of_domain"] == []
    assert any("shorter side 1 px" in r for r in rows["dot"]["out_of_domain"])
    assert any("aspect ratio 5000 " in r for r in rows["strip"]["out_of_domain"])
    warned = [line for line in err.splitlines() if line.startswith("unix: warning:") and "far from the images" in line]
    assert {Path(line.split(": ")[2]).name for line in warned} >= {"dot.png", "strip.png"} and "Traceback" not in err
    assert_one_line(err, "corrupt.png")
    code, _, _ = run(["report", tmp_path / "phantom.png", "--weights", demo_copy, "--out", tmp_path / "r2.csv",
                      "--max-new-tokens", "2", "-q"], capsys)
    assert code == 0 and "out_of_domain" in (tmp_path / "r2.csv").read_text().splitlines()[0]  # a column, empty: no statistics


def test_held_out_phantom_images_are_in_domain_of_the_shipped_model():
    from unix.data.phantom import generate
    from unix.infer.domain import far_from_training, read_input_stats

    stats = read_input_stats(DEMO)
    for i in (9000, 9001, 9002):
        assert far_from_training(generate(0, i, split="test").image / 255.0, stats) == []
    image = generate(0, 3).image / 255.0
    assert any("histogram" in r for r in far_from_training(1.0 - image, stats))  # a MONOCHROME1 mix-up
    assert any("intensity spread" in r for r in far_from_training(np.full((256, 256), 0.5), stats))


# --- for the newcomer --------------------------------------------------------------------------

def test_phantom_test_split_never_holds_a_training_image(tmp_path, capsys):
    from unix.data.phantom import encode_png, generate
    from unix.data.shards import iter_rows

    out = tmp_path / "ds"
    code, printed, _ = run(["data", "phantom", "--out", out, "--n", "10", "--seed", "0", "--size", "64", "--splits", "0.6,0.2,0.2"], capsys)
    assert code == 0 and "train 6, val 2, test 2" in printed
    rows = list(iter_rows(out))
    assert [r["id"] for r in rows if r["split"] == "test"] == ["phantom-0-test-0000008", "phantom-0-test-0000009"]
    for r in rows:  # training rows are the shipped model's images (rng([0, i])); held-out rows are not
        index = int(r["id"][-7:])
        same = r["image"] == encode_png(generate(0, index, 64).image)
        assert same == (r["split"] == "train"), r["id"]


def test_quiet_hides_the_demo_notice(tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="unix")
    assert run(["report", EXAMPLE, "--max-new-tokens", "2", "-q"], capsys)[0] == 0
    assert "embedded demo model" not in caplog.text
    assert run(["report", EXAMPLE, "--max-new-tokens", "2"], capsys)[0] == 0
    assert "embedded demo model" in caplog.text


def test_version_and_lazy_subpackages(capsys):
    from unix import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"unix {__version__}"
    done = subprocess.run([sys.executable, "-c", "import unix; print(unix.infer.load_pipeline.__name__, unix.flow.schedule.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["load_pipeline", "schedule"], done.stderr
    with pytest.raises(AttributeError):
        unix_module = __import__("unix")
        unix_module.nothing_here


# Options whose parser lives in a file this change does not touch; each must still lack help, so
# that this list shrinks when they are fixed (then delete the entry).
KNOWN_WITHOUT_HELP: set = set()


def test_every_option_has_help():
    missing = set()

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                for name, sub in action.choices.items():
                    if name not in helped:
                        missing.add((path, name))
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.add((path, (action.option_strings or [action.dest])[0]))

    walk(build_parser(), "unix")
    assert missing == KNOWN_WITHOUT_HELP


def test_interrupted_runs_keep_what_they_finished(tmp_path, capsys, monkeypatch):
    from unix.infer.pipeline import Pipeline

    real_reports, real_images, calls = Pipeline.reports, Pipeline.images, []

    def second_call_interrupted(real):
        def wrapped(self, *args, **kwargs):
            calls.append(real.__name__)
            if calls.count(real.__name__) == 2:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(Pipeline, "reports", second_call_interrupted(real_reports))
    monkeypatch.setattr(Pipeline, "images", second_call_interrupted(real_images))
    for i in range(3):
        shutil.copy(EXAMPLE, tmp_path / f"x{i}.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    out = tmp_path / "r.jsonl"
    code, _, err = run(["report", *sorted(tmp_path.glob("*.png")), "--batch-size", "2", "--max-new-tokens", "2", "--out", out, "-q"], capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 130 and "3 of 4 rows written" in err  # the unreadable file's row and the first batch's two reports
    assert [r["id"] for r in rows] == ["broken", "x0", "x1"] and rows[1]["report"] is not None
    gen = tmp_path / "gen"
    code, _, _ = run(GENERATE + ["A.", "B.", "C.", "--batch-size", "2", "--out", gen], capsys)
    manifest = [json.loads(line)["id"] for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert code == 130 and manifest == ["prompt000", "prompt001"] and sorted(p.name for p in gen.glob("*.png")) == ["prompt000.png", "prompt001.png"]
