"""Quality of a phantom model on the CXR-Phantom test split (issue: staged training / phantom-tiny).

Reports: the model writes a report for every test image; the rule labeller reads it; micro-F1 over
the 14 observations (uncertain as negative) against the image's true labels.
Images: the model draws one image per test report; the phantom classifier labels it; micro-F1
against the labels of the report (finding agreement), next to the classifier's micro-F1 on the real
test images (the ceiling) and the same images against the labels of shuffled reports (the floor);
Frechet distance in the classifier's feature space against the real test images, next to the
distance between two halves of the real test set.

    .venv/bin/python scripts/bench_phantom.py --weights weights/phantom-tiny --data runs/phantom/data
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unix.data.dataset import decode_gray
from unix.data.shards import iter_rows
from unix.eval.chexpert import CHEXPERT_FINDINGS
from unix.eval.image_metrics import finding_agreement, frechet_distance, positive
from unix.eval.phantom_classifier import load_extractor
from unix.eval.report_metrics import clinical_f1
from unix.eval.rule_labeler import RuleLabeler
from unix.infer.images import ImageSettings
from unix.infer.io import atomic_write
from unix.infer.pipeline import load_pipeline
from unix.infer.reports import ReportSettings


def test_rows(data: str, n: int) -> list[dict]:
    rows = []
    for row in iter_rows(data, "test"):
        rows.append(row)
        if len(rows) == n:
            break
    if not rows:
        sys.exit(f"{data}: no test split")
    return rows


def true_labels(rows: list[dict]) -> np.ndarray:
    return np.array([[np.nan if r[f] is None else r[f] for f in CHEXPERT_FINDINGS] for r in rows], dtype=np.float64)


def bench_reports(pipe, rows: list[dict], batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for r in rows:
            paths.append(Path(tmp) / f"{r['id']}.png")
            paths[-1].write_bytes(r["image"])
        t0, preds = time.perf_counter(), []
        for i in range(0, len(paths), batch):
            preds += pipe.reports([str(p) for p in paths[i:i + batch]], ReportSettings(max_new_tokens=160))
    seconds = time.perf_counter() - t0
    pred = np.array(RuleLabeler()(preds), dtype=np.float64)
    pred_pos, true_pos = positive(pred), positive(true_labels(rows))
    scores = clinical_f1(pred_pos, true_pos)
    per_finding = {f: {"f1": scores["f1_" + f], "true": int(true_pos[:, j].sum()), "written": int(pred_pos[:, j].sum())}
                   for j, f in enumerate(CHEXPERT_FINDINGS)}
    return {"n": len(rows), "micro_f1": scores["micro_f1_14"], "macro_f1": scores["macro_f1_14"], "micro_f1_5": scores["micro_f1_5"],
            "seconds": seconds, "per_finding": per_finding, "examples": [{"id": r["id"], "true": r["report"], "pred": p} for r, p in zip(rows[:5], preds[:5])]}


def per_finding_f1(agreement: dict) -> dict:
    return {f: v["f1"] for f, v in agreement["per_finding"].items()}


def bench_images(pipe, rows: list[dict], batch: int, settings: ImageSettings, weights_dir: str) -> dict:
    extractor = load_extractor(weights_dir)
    real = torch.stack([decode_gray(r["image"], extractor.input_size, 0.0) for r in rows])
    t0, fake = time.perf_counter(), []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        images = pipe.images([r["report"] for r in chunk], [i + k for k in range(len(chunk))], settings)
        fake += [torch.from_numpy(x)[None] for x in images]
    seconds = time.perf_counter() - t0
    fake = torch.stack(fake)
    labels = true_labels(rows)
    real_pred = (extractor.predict(real).numpy() >= 0.5).astype(float)
    fake_pred = (extractor.predict(fake).numpy() >= 0.5).astype(float)
    f_real, f_fake = extractor(real).numpy(), extractor(fake).numpy()
    half = len(rows) // 2
    agreement, on_real = finding_agreement(fake_pred, labels), finding_agreement(real_pred, labels)
    return {
        "n": len(rows), "size": settings.size, "steps": settings.steps, "guidance": settings.guidance, "shift": settings.shift,
        "guidance_interval": list(settings.interval), "seconds": seconds,
        "agreement_micro_f1": agreement["micro_f1"],
        # the floor: the same images scored against the labels of other reports (a fixed shuffle);
        # a model that ignores its prompt scores about this
        "agreement_shuffled_micro_f1": finding_agreement(fake_pred, labels[np.random.default_rng(0).permutation(len(rows))])["micro_f1"],
        "classifier_on_real_micro_f1": on_real["micro_f1"],
        "fd_generated_vs_real": frechet_distance(f_real, f_fake),
        "fd_real_half_vs_half": frechet_distance(f_real[:half], f_real[half:2 * half]),
        "agreement_per_finding": per_finding_f1(agreement),
        "classifier_on_real_per_finding": per_finding_f1(on_real),
    }


@torch.no_grad()
def bench_vae(pipe, rows: list[dict], batch: int, weights_dir: str, size: int) -> dict:
    """The VAE's own ceiling: the test images at `size` through encode -> decode, read like generated ones."""
    extractor = load_extractor(weights_dir)
    real = torch.stack([decode_gray(r["image"], size, 0.0) for r in rows])
    recon = []
    for i in range(0, len(rows), batch):
        y = pipe.codec.decode(pipe.codec.encode_gray(real[i:i + batch])).float()
        recon.append((y / 2 + 0.5).clamp(0, 1).mean(dim=1, keepdim=True))  # as Pipeline.images turns latents into pixels
    recon = torch.cat(recon)
    labels = true_labels(rows)
    pred = (extractor.predict(recon).numpy() >= 0.5).astype(float)
    agreement = finding_agreement(pred, labels)
    return {"n": len(rows), "size": size, "l1": float((recon - real).abs().mean()) * 2,  # in [-1, 1] units, as train-vae reports
            "agreement_micro_f1": agreement["micro_f1"],
            "fd_reconstructed_vs_real": frechet_distance(extractor(real).numpy(), extractor(recon).numpy()),
            "agreement_per_finding": per_finding_f1(agreement)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model folder (default: weights/phantom-tiny)")
    p.add_argument("--data", required=True, help="CXR-Phantom shard folder with a test split")
    p.add_argument("--n", type=int, default=600, help="test images (default: all 600 of a 6000-image set)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps per image (default: 30)")
    # the rest as unix generate: the weights folder's sampling.json, else the release's values
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: as unix generate)")
    p.add_argument("--shift", type=float, help="timestep shift of the sampling schedule (default: as unix generate)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only while the shifted t is in (LO, HI] (default: as unix generate)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, help="generated and reconstructed image side in px (default: the model's largest)")
    p.add_argument("--weights-dir", default="weights", help="folder holding phantom-classifier/")
    p.add_argument("--skip", choices=["reports", "images", "vae"], action="append", default=[])
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(args.weights, device="cpu")
    rows = test_rows(args.data, args.n)
    size = args.size or pipe.cfg.max_image_size
    result = {"weights": str(pipe.folder), "data": args.data}
    if "reports" not in args.skip:
        result["reports"] = bench_reports(pipe, rows, args.batch_size)
        print(json.dumps(result["reports"], indent=1), flush=True)
    if "images" not in args.skip:
        settings = pipe.image_settings(size=size, steps=args.steps, guidance=args.guidance, shift=args.shift,
                                       interval=tuple(args.guidance_interval) if args.guidance_interval else None)
        result["images"] = bench_images(pipe, rows, args.batch_size, settings, args.weights_dir)
        print(json.dumps(result["images"], indent=1), flush=True)
    if "vae" not in args.skip:
        result["vae"] = bench_vae(pipe, rows, args.batch_size, args.weights_dir, size)
        print(json.dumps(result["vae"], indent=1), flush=True)
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
