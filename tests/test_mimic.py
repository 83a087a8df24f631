"""`unix data mimic`: report sections, each cleaning rule, the fixture tree, and the ingest (counts per
drop reason, exact rows, workers, resume, views, zip reports, rewrite hooks, the CLI)."""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mimic_fixture import build_mimic_tree
from unix.data import mimic_clean as mc
from unix.data import mimic_ingest
from unix.data.mimic import findings_and_impression, load_image, plan_studies, split_sections
from unix.data.mimic_ingest import Options, ingest
from unix.data.mimic_rewrite import REWRITE_PROMPT, ModelRewriter
from unix.data.release_files import read_generation_prompts, read_test_file
from unix.data.shards import iter_rows, shard_paths
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.errors import UserError

SIZE = 128  # fixture images are 208 x 256: stored 104 x 128
SHARD_STUDIES = 4


# --------------------------------------------------------------------------- sections

REPORT = """ WET READ: ___ ___ ___ 4:15 PM
  Possible left effusion. Preliminary read.
 ______________________________________________________________________________
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // eval for pneumonia

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear. Heart size is
 normal.

 IMPRESSION:  No acute cardiopulmonary process.
"""


def test_sections_after_final_report_only():
    sections = split_sections(REPORT)
    assert [h for h, _ in sections] == ["EXAMINATION", "INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"]
    findings, impression = findings_and_impression(REPORT)
    assert findings.split() == "The lungs are clear. Heart size is normal.".split()
    assert impression == "No acute cardiopulmonary process."
    assert "Possible left effusion" not in findings + impression  # the wet read is a preliminary read


@pytest.mark.parametrize("text, expected", [
    (" FINDINGS AND IMPRESSION:  Clear lungs.\n", ("Clear lungs.", "")),
    (" FINDINGS:  Clear lungs.\n CONCLUSION:  Normal.\n", ("Clear lungs.", "Normal.")),
    (" IMPRESSION:  Normal.\n", ("", "Normal.")),
    (" INDICATION:  Cough.\n PA and lateral views of the chest. The lungs are clear.\n", ("", "")),
    (" FINDINGS:  Left effusion.\n NOTIFICATION:  Dr. ___ was paged.\n IMPRESSION:  Effusion.\n", ("Left effusion.", "Effusion.")),
])
def test_section_aliases_and_dropped_sections(text, expected):
    assert findings_and_impression(text) == expected


# --------------------------------------------------------------------------- cleaning rules (docs/data.md lists these)

RULE_CASES = {
    mc.drop_notification: [
        ("Dr. ___ was paged at 3:15 pm on ___ to discuss these findings.", ""),
        ("Findings were discussed with Dr. ___ by telephone at 10:42 a.m. on ___, 2 minutes after discovery.", ""),
        ("These findings were communicated to the referring team.", ""),
        ("Telephone notification to the ICU team at 3:15 p.m.", ""),
        ("The endotracheal tube terminates 4 cm above the carina.", "The endotracheal tube terminates 4 cm above the carina."),
    ],
    mc.remove_prior_reference: [
        ("Compared to the prior study of ___, the heart is enlarged.", "The heart is enlarged."),
        ("As compared to the previous radiograph, the left effusion has increased.", "The left effusion has increased."),
        ("Small left pleural effusion, unchanged from the prior study.", "Small left pleural effusion, unchanged."),
        ("The lungs are clear compared to prior.", "The lungs are clear."),
        ("Compared to the film from earlier the same day, the tube was removed.", "The tube was removed."),
        ("Improved opacities compared to prior state.", "Improved opacities compared to prior state."),  # no exam named
        ("Left basilar opacity is again seen.", "Left basilar opacity is seen."),
        ("Moderate cardiomegaly, as before.", "Moderate cardiomegaly."),
        ("Comparison is made to ___.", ""),
        ("Calcified granuloma from prior granulomatous disease.", "Calcified granuloma from prior granulomatous disease."),
    ],
    mc.remove_interval: [
        ("Interval placement of a right PICC with tip in the mid SVC.", "Placement of a right PICC with tip in the mid SVC."),
        ("The effusion has decreased in the interval.", "The effusion has decreased."),
        ("There has been interval improvement in edema.", "There has been improvement in edema."),
        ("Widening of the right acromioclavicular interval is present.", "Widening of the right acromioclavicular interval is present."),
    ],
    mc.drop_no_change: [
        ("There is no significant change.", ""),
        ("The exam is otherwise unchanged.", ""),
        ("Stable appearance of the chest.", ""),
        ("Heart size is stable.", "Heart size is stable."),
        ("No change in the small left effusion.", "No change in the small left effusion."),
    ],
    mc.remove_dates_times: [
        ("Radiograph obtained at 07:45 on 3/14/2015.", "Radiograph obtained."),
        ("The tube was placed at 2 pm.", "The tube was placed."),
        ("The nodule decreased 5 mm since December 3.", "The nodule decreased 5 mm."),
        ("Right 5th rib fracture, 2 cm lesion.", "Right 5th rib fracture, 2 cm lesion."),
    ],
    mc.remove_blanks: [
        ("Right IJ catheter (placed on ___) terminates in the SVC.", "Right IJ catheter terminates in the SVC."),
        ("Since ___, the effusion has resolved.", "The effusion has resolved."),
        ("The chest tube placed at ___ on ___ is in place.", "The chest tube placed is in place."),
        ("Please refer to the ___ report for details.", ""),
        ("No pneumothorax.", "No pneumothorax."),
    ],
}


@pytest.mark.parametrize("rule, before, after", [(r, b, a) for r, cases in RULE_CASES.items() for b, a in cases],
                         ids=lambda x: x.__name__ if callable(x) else None)
def test_rule(rule, before, after):
    assert rule(before) == after


def test_every_rule_has_cases():
    assert set(RULE_CASES) == set(mc.RULES)


def test_one_line_sentences_and_tidy():
    assert mc.one_line(" The lungs\n are clear.\n\n  No effusion. ") == "The lungs are clear. No effusion."
    assert mc.split_sentences("1. Effusion. 2. Dr. ___ was paged. Edema.") == ["1. Effusion.", "2. Dr. ___ was paged.", "Edema."]
    assert mc.tidy(" , the heart is enlarged ,") == "The heart is enlarged."
    assert mc.tidy(" , .") == ""


def test_clean_section_order_counts_and_numbering():
    text = ("1. Bibasilar opacities.\n 2. Compared to the prior study, no significant interval change. 3. Dr. ___ was\n"
            " paged. 4. Mild edema.")
    cleaned, notes = mc.clean_section(text)
    assert cleaned == "1. Bibasilar opacities. 2. Mild edema."
    assert notes == Counter(drop_notification=1, remove_prior_reference=1, remove_interval=1, drop_no_change=1)


def test_clean_report_format():
    assert mc.clean_report("Clear lungs.", "Normal.")[0] == "FINDINGS: Clear lungs. IMPRESSION: Normal."
    report, notes = mc.clean_report("Clear lungs.", "No significant change since the prior study.")
    assert report == "FINDINGS: Clear lungs." and notes["impression_emptied"] == 1
    assert mc.clean_report("Compared to the prior study of ___, there is no significant interval change.", "Normal.")[0] is None


# --------------------------------------------------------------------------- fixture and ingest

def run(fx, out: Path, reports: Path | None = None, workers: int = 1, overwrite: bool = False, **options):
    return ingest(fx["root"], reports or fx["reports"], out, Options(**options), workers, overwrite, progress=False)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_mimic_tree(tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def done(fx, tmp_path_factory):
    """One finished ingest with one worker: (output folder, summary)."""
    out = tmp_path_factory.mktemp("ingest") / "mimic"
    summary, worked = run(fx, out, image_size=SIZE, shard_studies=SHARD_STUDIES)
    assert worked
    return out, summary


def tables(out: Path) -> dict[str, str]:
    """Each shard's rows as text (repr: NaN labels compare equal, unlike in Table.equals)."""
    return {p.name: repr(pq.read_table(p).to_pylist()) for p in shard_paths(out)}


def test_fixture_tree_is_mimic_shaped(fx):
    root = fx["root"]
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt") as f:
        header = f.readline().strip().split(",")
    assert header[:2] == ["subject_id", "study_id"] and sorted(header[2:]) == sorted(CHEXPERT_FINDINGS)
    for dicom, e in fx["expected"].items():
        assert (root / e["path"]).is_file() and e["path"].endswith(f"/s{e['study_id']}/{dicom}.jpg")
        assert e["path"].startswith(f"files/p{e['subject_id'][:2]}/p{e['subject_id']}/")
    items = read_test_file(fx["test_json"])
    test_ids = sorted(d for d, e in fx["expected"].items() if e["split"] == "test")
    assert sorted(i.id for i in items) == test_ids and len(items) >= 3
    assert all(i.reference == fx["expected"][i.id]["report"] and "FINDINGS" in i.instruction for i in items)
    prompts = read_generation_prompts(fx["prompts_csv"])
    assert [p.real_path for p in prompts] == [i.image for i in items]
    assert all(set(p.labels) == set(CHEXPERT_FINDINGS) and p.filename == f"SyntheticImg_{n}.png" for n, p in enumerate(prompts))


def test_summary_counts_every_drop_reason(fx, done):
    out, summary = done
    want: dict[str, Counter] = {}
    for split, reason in fx["dropped"].values():
        want.setdefault(split, Counter())[reason] += 1
    assert summary["unsplit_dropped"] == dict(want.pop("unsplit"))
    for split in ("train", "val", "test"):
        assert summary["splits"][split]["dropped"] == dict(want.get(split, {})), split
        assert summary["splits"][split]["rows"] == sum(e["split"] == split for e in fx["expected"].values())
    assert {"unreadable_image", "no_report", "impression_only", "no_findings_or_impression", "empty_after_cleaning",
            "view_excluded", "missing_split_row"} <= set(summary["dropped_total"])
    assert any(fx["roles"]["corrupt_image"] in x for x in summary["examples"]["unreadable_image"])
    assert summary["splits"]["train"]["labels_missing"] == 1
    assert summary["cleaning"]["drop_notification"] > 0 and summary["cleaning"]["remove_prior_reference"] > 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_rows_are_the_cleaned_reports_images_and_labels(fx, done):
    out, _ = done
    rows = list(iter_rows(out))
    assert sorted(r["id"] for r in rows) == sorted(fx["expected"])
    for split in ("train", "val", "test"):  # (subject, study, dicom) order inside a split
        ids = [r["id"] for r in rows if r["split"] == split]
        e = fx["expected"]
        assert ids == sorted(ids, key=lambda d: (int(e[d]["subject_id"]), int(e[d]["study_id"]), d))
    for row in rows:
        e = fx["expected"][row["id"]]
        assert row["split"] == e["split"] and row["report"] == e["report"] and "___" not in row["report"]
        assert {k: (None if math.isnan(row[k]) else row[k]) for k in CHEXPERT_FINDINGS} == e["labels"]
        with Image.open(io.BytesIO(row["image"])) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (row["width"], row["height"]) == (104, 128)
        a = json.loads(row["attributes"])
        assert (a["subject_id"], a["study_id"], a["dicom_id"], a["view"], a["source"]) == (
            e["subject_id"], e["study_id"], row["id"], e["view"], e["path"])
        assert a["original_size"] == [208, 256] and a["labels_missing"] == (e["study_id"] == fx["roles"]["missing_labels"])


def test_image_matches_a_direct_resize_of_the_jpg(fx, done):
    out, _ = done
    row = next(iter_rows(out, "val"))
    with Image.open(fx["root"] / fx["expected"][row["id"]]["path"]) as im:
        direct = np.asarray(im.convert("L").resize((104, 128), Image.LANCZOS), dtype=np.int16)
    stored = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.int16)
    # libjpeg's half-scale IDCT vs a full decode + Lanczos: the same picture, apart from edge ringing
    assert np.abs(stored - direct).mean() < 1.5


def test_two_workers_write_identical_shards(fx, done, tmp_path):
    out, _ = done
    run(fx, tmp_path / "w2", workers=2, image_size=SIZE, shard_studies=SHARD_STUDIES)
    ref, two = tables(out), tables(tmp_path / "w2")
    assert list(ref) == list(two) and len(ref) > 3
    for name in ref:
        assert ref[name] == two[name], name
        assert (out / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_interrupted_run_resumes_without_redoing_shards(fx, done, tmp_path, monkeypatch):
    out, _ = done
    target, options = tmp_path / "resume", Options(image_size=SIZE, shard_studies=SHARD_STUDIES)
    real, calls = mimic_ingest.write_part, []

    def write_then_stop(o, chunk, outcomes):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(chunk.name)
        real(o, chunk, outcomes)

    monkeypatch.setattr(mimic_ingest, "write_part", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ingest(fx["root"], fx["reports"], target, options, progress=False)
    assert not (target / "summary.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in shard_paths(target)}
    assert sorted(first) == sorted(f"{c}.parquet" for c in calls)
    monkeypatch.setattr(mimic_ingest, "write_part", lambda o, chunk, outcomes: (calls.append(chunk.name), real(o, chunk, outcomes)))
    _, worked = ingest(fx["root"], fx["reports"], target, options, progress=False)
    assert worked and len(calls) == len(set(calls))  # no shard written twice
    assert {n: (target / n).stat().st_mtime_ns for n in first} == first
    assert tables(target).keys() == tables(out).keys()
    assert tables(target) == tables(out)
    n_calls = len(calls)
    summary, worked = ingest(fx["root"], fx["reports"], target, options, progress=False)  # finished: a no-op
    assert not worked and len(calls) == n_calls and summary["rows"] == len(fx["expected"])
    (target / f"{calls[-1]}.parquet").unlink()  # a shard lost after the run is written again
    _, worked = ingest(fx["root"], fx["reports"], target, options, progress=False)
    assert worked and calls[-1] == calls[n_calls - 1] and len(calls) == n_calls + 1 and tables(target) == tables(out)


def test_changed_options_need_overwrite(fx, tmp_path):
    out = tmp_path / "o"
    small = Options(image_size=64, shard_studies=50, limit=2)
    ingest(fx["root"], fx["reports"], out, small, progress=False)
    with pytest.raises(UserError, match="image_size 64 -> 96"):
        run(fx, out, image_size=96, shard_studies=50, limit=2)
    summary, worked = run(fx, out, overwrite=True, image_size=96, shard_studies=50, limit=2)
    assert worked and all(r["height"] == 96 for r in iter_rows(out))
    assert run(fx, out, overwrite=True, image_size=96, shard_studies=50, limit=2)[1]  # same options: done again
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        ingest(fx["root"], fx["reports"], tmp_path / "other", small, progress=False)


def test_views_and_zip_reports(fx, done, tmp_path):
    out, _ = done
    lateral = sum(reason is None for reason in fx["lateral"].values())
    for options in (Options(views=("PA", "AP", "LATERAL"), image_size=SIZE), Options(views=None, image_size=SIZE)):
        summary, _ = ingest(fx["root"], fx["reports"], tmp_path / str(options.views), options, progress=False)
        assert summary["rows"] == len(fx["expected"]) + lateral and "view_excluded" not in summary["dropped_total"]
    zipped, _ = run(fx, tmp_path / "zip", fx["reports_zip"], image_size=SIZE, shard_studies=SHARD_STUDIES)
    assert [(r["id"], r["report"]) for r in iter_rows(tmp_path / "zip")] == [(r["id"], r["report"]) for r in iter_rows(out)]


def test_rewrite_command_and_its_failures(fx, tmp_path):
    options = Options(image_size=64, limit=3, rewrite_cmd="tr a-z A-Z")
    summary, _ = ingest(fx["root"], fx["reports"], tmp_path / "upper", options, progress=False)
    rows = list(iter_rows(tmp_path / "upper"))
    assert rows and all(r["report"] == fx["expected"][r["id"]]["report"].upper() for r in rows)
    assert all(json.loads(r["attributes"])["rewritten"] for r in rows)
    failing = Options(image_size=64, limit=3, rewrite_cmd="echo broken >&2; exit 3")
    summary, _ = ingest(fx["root"], fx["reports"], tmp_path / "fail", failing, progress=False)
    assert summary["rows"] == 0 and summary["dropped_total"]["rewrite_failed"] >= 3
    assert "exited with 3: broken" in summary["examples"]["rewrite_failed"][0]
    bad_format = Options(image_size=64, limit=1, rewrite_cmd="echo The lungs are clear.")
    summary, _ = ingest(fx["root"], fx["reports"], tmp_path / "fmt", bad_format, progress=False)
    assert summary["rows"] == 0 and "does not start with 'FINDINGS: '" in summary["examples"]["rewrite_failed"][0]


def test_rewrite_model_hook_runs_a_local_causal_lm(fx, tmp_path):
    """A tiny random Llama with a word-level tokenizer: the hook loads it, prompts it, and (its
    output being noise) drops the study as rewrite_failed with the model's text as the example."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for e in fx["expected"].values() for w in e["report"].split()} | set(REWRITE_PROMPT.split()))
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *words])}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    folder = tmp_path / "lm"
    tok.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, eos_token_id=1)).save_pretrained(folder)
    summary, _ = run(fx, tmp_path / "out", image_size=64, limit=1, rewrite_model=str(folder))
    assert summary["rows"] == 0 and summary["dropped_total"]["rewrite_failed"] >= 1
    assert "does not start with 'FINDINGS: '" in summary["examples"]["rewrite_failed"][0]
    rewriter = ModelRewriter(folder)
    rewriter.tokenizer = tok
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <eos>{% endif %}"
    ids = rewriter.prompt_ids("FINDINGS: Clear.")
    assert ids[-1] == tok.eos_token_id and ids[:-1] == tok(REWRITE_PROMPT.format(report="FINDINGS: Clear."))["input_ids"]
    with pytest.raises(UserError, match="config.json"):
        run(fx, tmp_path / "x", rewrite_model=str(tmp_path))


def test_shards_feed_the_training_stream(done):
    from unix.data.dataset import RowStream, decode_gray

    out, _ = done
    stream = RowStream(str(out), "train", seed=0)
    row = stream.next()
    assert row["report"].startswith("FINDINGS: ")
    assert tuple(decode_gray(row["image"], 384, fill=1.0).shape) == (1, 384, 384)


def test_cli(fx, tmp_path, capsys):
    from unix.cli import main

    args = ["data", "mimic", "--root", str(fx["root"]), "--reports", str(fx["reports"]), "--out", str(tmp_path / "c"),
            "--image-size", "64", "--limit", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "view_excluded" in text and "wrote" in text
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(args[:-4] + ["--views", " , "]) != 0 and "--views must name" in capsys.readouterr().err
    assert main(["data", "mimic", "--root", str(tmp_path), "--out", str(tmp_path / "d")]) != 0
    assert "no files/ folder" in capsys.readouterr().err
    assert main(["data", "mimic", "--root", str(fx["root"]), "--out", str(tmp_path / "e")]) != 0  # reports not in --root
    assert "none of the first 20 studies has a report" in capsys.readouterr().err


# --------------------------------------------------------------------------- inputs

def test_large_jpg_is_decoded_at_a_reduced_scale_without_losing_quality(tmp_path):
    y, x = np.mgrid[0:1200, 0:1000]
    image = (127 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0) + 40 * (y / 1200)).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(image).save(path, quality=95)
    small, original = load_image(path, 256)
    assert original == (1000, 1200) and small.shape == (256, 213)  # (H, W): longer side 256, aspect kept
    with Image.open(path) as im:
        full = np.asarray(im.convert("L").resize((213, 256), Image.LANCZOS), dtype=np.int16)
    assert np.abs(small.astype(np.int16) - full).mean() < 1.0
    assert load_image(path, 4096)[0].shape == (1200, 1000)  # never upscaled


def test_table_errors_name_the_file_and_field(fx, tmp_path):
    root = tmp_path / "jpg"
    shutil.copytree(fx["root"], root, ignore=shutil.ignore_patterns("files"))
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id\n")
    with pytest.raises(UserError, match="split.csv.gz: missing column\\(s\\) split"):
        plan_studies(root, ("PA",))
    shutil.copy(fx["root"] / "mimic-cxr-2.0.0-split.csv.gz", root)
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:
        f.write("subject_id,study_id," + ",".join(CHEXPERT_FINDINGS) + "\n1,5," + ",".join(["2.0"] * 14) + "\n")
    with pytest.raises(UserError, match="CheXpert value '2.0'"):
        plan_studies(root, ("PA",))
