"""A MIMIC-CXR-shaped fixture tree, with no real patient data in it.

`build_mimic_tree(root)` writes, under `root`:
  mimic-cxr-jpg/files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg   CXR-Phantom images saved as JPG (portrait)
  mimic-cxr-jpg/mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz   the three tables, gzip'ed
  mimic-cxr/files/pXX/pSUBJECT/sSTUDY.txt                  MIMIC-style free-text reports
  mimic-cxr-reports.zip                                     the same reports, zipped (files/... inside)
  eval/test_data.json, eval/generations_with_metadata.csv  the authors' evaluation files for the test split

A study's report is its phantom report (FINDINGS + IMPRESSION) wrapped in MIMIC's other sections
(INDICATION, TECHNIQUE, COMPARISON, sometimes a WET READ) with removable noise added: comparisons
with a prior study, "___" blanks, clinician notifications. The cleaning rules must give the phantom
report back exactly, which is what `expected[dicom]["report"]` holds. Special studies exercise every
drop reason: a corrupt JPG, a missing report, an impression-only report, a report without sections,
a report that is empty once cleaned, an image missing from the split table, lateral views; one study
has no CheXpert row (kept, labels blank).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import textwrap
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from unix.data.phantom import generate
from unix.eval.chexpert import CHEXPERT_FINDINGS

IMAGE_WH = (208, 256)  # portrait, about MIMIC's 2544 x 3056 aspect
PHANTOM_SIZE = 256
JPEG_QUALITY = 90
METADATA_HEADER = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                   "PatientOrientationCodeSequence_CodeMeaning")
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
INSTRUCTIONS = {True: "Provide the FINDINGS and IMPRESSION for this chest X-ray.",  # reference/unix-compat.md 5.2
                False: "Examine this X-ray image and describe the FINDINGS."}
FINDINGS_NOISE = (  # sentences the cleaning removes entirely
    "Compared to the prior study of ___, there is no significant interval change.",
    "No relevant change since the previous radiograph.",
    "Please refer to the separate ___ report for the abdominal findings.",
)
IMPRESSION_NOISE = (
    "Findings were discussed with Dr. ___ by telephone at 10:42 a.m. on ___, 2 minutes after discovery.",
    "Dr. ___ was paged at 3:15 pm on ___ to discuss these findings.",
)
ROLES = ("corrupt_image", "missing_report", "impression_only", "no_sections", "missing_labels", "missing_split_row",
         "two_frontal", "empty_after_cleaning", "findings_and_impression")


def _gz_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every build
        f.write(buf.getvalue().encode())


def _jpg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize(IMAGE_WH, Image.BICUBIC).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=76, initial_indent=" ", subsequent_indent=" ", break_on_hyphens=False,
                         break_long_words=False)


def _noisy(findings: str, impression: str, rng: np.random.Generator) -> tuple[str, str]:
    """The phantom sections with removable noise: a noise sentence, a comparison prefix, a notification."""
    sentences = findings.split(". ")
    first = sentences[0]
    if rng.random() < 0.5 and len(first) > 1 and first[1].islower():
        sentences[0] = "As compared to the previous radiograph, " + first[0].lower() + first[1:]
    noisy = ". ".join(sentences)
    noise = FINDINGS_NOISE[rng.integers(len(FINDINGS_NOISE))]
    noisy = f"{noise} {noisy}" if rng.random() < 0.5 else f"{noisy} {noise}"
    if rng.random() < 0.7:
        impression = f"{impression} {IMPRESSION_NOISE[rng.integers(len(IMPRESSION_NOISE))]}"
    return noisy, impression


def _report(findings: str | None, impression: str | None, old_style: bool, combined: bool = False,
            free_text: str | None = None) -> str:
    """A report laid out as MIMIC-CXR's are (header block, sections, wrapped lines)."""
    lines = []
    if old_style:
        lines += [" WET READ: ___ ___ ___ 4:15 PM", "  No pneumothorax. Preliminary read.", " " + "_" * 78]
    lines += ["                                 FINAL REPORT"]
    if old_style:
        lines += [" HISTORY:  ___-year-old with shortness of breath.", " "]
    else:
        lines += [" EXAMINATION:  CHEST (PA AND LAT)", " ", " INDICATION:  ___ year old woman with cough  // eval for pneumonia",
                  " ", " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  ___", " "]
    if free_text is not None:
        lines += [_wrap(free_text)]
    if findings is not None:
        header = "FINDINGS AND IMPRESSION:" if combined else "FINDINGS:"
        lines += [f" {header}  " + _wrap(findings).strip()] if old_style else [f" {header}", " ", _wrap(findings), " "]
    if impression is not None:
        lines += [" IMPRESSION: ", " ", _wrap(impression)]
    return "\n".join(lines) + "\n"


def _ids(rng: np.random.Generator, n_subjects: int, n_studies: int) -> tuple[list[str], list[str]]:
    subjects = [f"1{k % 10}{v:06d}" for k, v in enumerate(rng.choice(10**6, n_subjects, replace=False))]
    studies = [f"5{v:07d}" for v in rng.choice(10**7, n_studies, replace=False)]
    return subjects, studies


def build_mimic_tree(root: Path, n_studies: int = 30, seed: int = 0, zip_reports: bool = True) -> dict:
    """Write the fixture tree under `root`; returns its paths and what an ingest must make of it:
    root, reports, reports_zip, test_json, prompts_csv (Paths); expected {dicom: {split, report,
    labels, view, path, subject_id, study_id}} for every image an ingest keeps with the default
    (frontal) views; dropped {dicom: (split, reason)}; roles {role: study_id}."""
    if n_studies < 2 * len(ROLES):
        raise ValueError(f"n_studies must be >= {2 * len(ROLES)} to hold every special case")
    rng = np.random.default_rng(seed)
    jpg_root, rep_root, eval_dir = root / "mimic-cxr-jpg", root / "mimic-cxr", root / "eval"
    n_subjects = (n_studies + 1) // 2
    subjects, study_ids = _ids(rng, n_subjects, n_studies)
    split_of_subject = ["test" if k % 5 == 3 else "validate" if k % 5 == 4 else "train" for k in range(n_subjects)]
    train = [j for j in range(n_studies) if split_of_subject[j // 2] == "train"]
    roles = dict(zip(ROLES, train))  # every special case is a training study
    by_study = {j: role for role, j in roles.items()}
    first_test = next(j for j in range(n_studies) if split_of_subject[j // 2] == "test")
    split_rows, meta_rows, label_rows, reports = [], [], [], {}
    expected, dropped, lateral = {}, {}, {}
    for j in range(n_studies):
        subject, study = subjects[j // 2], study_ids[j]
        split = split_of_subject[j // 2]
        ours = {"train": "train", "validate": "val", "test": "test"}[split]
        role = by_study.get(j)
        sample = generate(seed, j, PHANTOM_SIZE)
        findings, impression = sample.report[len("FINDINGS: "):].split(" IMPRESSION: ")
        noisy_f, noisy_i = _noisy(findings, impression, rng)
        old_style = j % 4 == 1
        reference = sample.report
        study_reason = None
        if role == "impression_only":
            text, study_reason = _report(None, noisy_i, old_style), "impression_only"
        elif role == "no_sections":
            text, study_reason = _report(None, None, old_style, free_text=f"{findings} {impression}"), "no_findings_or_impression"
        elif role == "empty_after_cleaning":
            text, study_reason = _report(FINDINGS_NOISE[0], "No significant change.", old_style), "empty_after_cleaning"
        elif role == "findings_and_impression":
            text = _report(f"{noisy_f} {impression}", None, old_style, combined=True)
            reference = f"FINDINGS: {findings} {impression}"
        else:
            text = _report(noisy_f, noisy_i, old_style)
        if role == "missing_report":
            study_reason = "no_report"
        else:
            reports[f"files/p{subject[:2]}/p{subject}/s{study}.txt"] = text
        images = [("PA" if j % 2 == 0 else "AP", sample.image)]
        if role == "two_frontal" or j == first_test:
            images.append(("AP", generate(seed, 1000 + j, PHANTOM_SIZE).image))
        if j % 3 == 0:
            images.append(("LATERAL", np.ascontiguousarray(np.fliplr(sample.image))))
        if role == "missing_split_row":
            images.append(("PA", generate(seed, 2000 + j, PHANTOM_SIZE).image))
        for n, (view, pixels) in enumerate(images):
            dicom = "-".join(f"{v:08x}" for v in rng.integers(0, 2**32, 5, dtype=np.uint64))
            rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            path = jpg_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            corrupt = role == "corrupt_image" and n == 0
            path.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg " * 20 if corrupt else _jpg(pixels))
            meta_rows.append((dicom, subject, study, "CHEST (PA AND LAT)", view, IMAGE_WH[1], IMAGE_WH[0],
                              21800506 + j, f"{101010 + j}.000", "CHEST (PA AND LAT)", VIEW_MEANING[view], "Erect"))
            unsplit = role == "missing_split_row" and n == len(images) - 1
            if unsplit:
                dropped[dicom] = ("unsplit", "missing_split_row")
                continue
            split_rows.append((dicom, study, subject, split))
            reason = ("view_excluded" if view == "LATERAL" else study_reason
                      or ("unreadable_image" if corrupt else None))
            if view == "LATERAL":
                lateral[dicom] = study_reason
            if reason:
                dropped[dicom] = (ours, reason)
            else:
                labels = None if role == "missing_labels" else sample.labels
                expected[dicom] = {"split": ours, "report": reference, "view": view, "path": rel, "subject_id": subject,
                                   "study_id": study, "labels": {k: (None if labels is None or np.isnan(labels[k]) else labels[k])
                                                                 for k in CHEXPERT_FINDINGS}}
        if role != "missing_labels":
            label_rows.append((subject, study, *("" if np.isnan(sample.labels[k]) else f"{sample.labels[k]:.1f}"
                                                 for k in sorted(CHEXPERT_FINDINGS))))
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-split.csv.gz", ("dicom_id", "study_id", "subject_id", "split"), split_rows)
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_HEADER, meta_rows)
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-chexpert.csv.gz", ("subject_id", "study_id", *sorted(CHEXPERT_FINDINGS)), label_rows)
    for rel, text in reports.items():
        (rep_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (rep_root / rel).write_text(text)
    zip_path = root / "mimic-cxr-reports.zip"
    if zip_reports:
        with zipfile.ZipFile(zip_path, "w") as z:
            for rel, text in sorted(reports.items()):
                z.writestr(rel, text)
    test_json, prompts_csv = _eval_files(eval_dir, expected)
    return {"root": jpg_root, "reports": rep_root, "reports_zip": zip_path if zip_reports else None,
            "test_json": test_json, "prompts_csv": prompts_csv, "expected": expected, "dropped": dropped, "lateral": lateral,
            "roles": {role: study_ids[j] for role, j in roles.items()}}


def _eval_files(folder: Path, expected: dict) -> tuple[Path, Path]:
    """The authors' test JSON and generation-prompt CSV for the kept test-split images."""
    folder.mkdir(parents=True, exist_ok=True)
    tests = sorted((e["subject_id"], e["study_id"], d) for d, e in expected.items() if e["split"] == "test")
    entries, prompts = [], []
    for n, (_, _, dicom) in enumerate(tests):
        e = expected[dicom]
        instruction = INSTRUCTIONS[" IMPRESSION: " in e["report"]]
        entries.append({"messages": [{"role": "user", "content": "<image>" + instruction},
                                     {"role": "assistant", "content": e["report"]}], "images": [e["path"]]})
        findings = e["report"][len("FINDINGS: "):].split(" IMPRESSION: ")[0]
        labels = {k: (float("nan") if e["labels"][k] is None else e["labels"][k]) for k in sorted(CHEXPERT_FINDINGS)}
        prompts.append({"id": n, "path": e["path"], "annotated_prompt": findings, "chexpert_labels": str(labels),
                        "synthetic_filename": f"SyntheticImg_{n}.png"})
    test_json = folder / "test_data.json"
    test_json.write_text(json.dumps(entries, indent=4))
    prompts_csv = folder / "generations_with_metadata.csv"
    with open(prompts_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "annotated_prompt", "chexpert_labels", "synthetic_filename"])
        writer.writeheader()
        writer.writerows(prompts)
    return test_json, prompts_csv
