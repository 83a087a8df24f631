"""`unix eval paper`: reproduce the paper's two tables from a weights folder and MIMIC-CXR.

    unix eval paper --weights weights/UniX --mimic MIMIC_CXR_JPG --test-file test_data.json \
                    --gen-prompts generations_with_metadata.csv [--out runs/paper] [--limit N]

Writes every report and every image (resumable, unix/eval/paper_run.py), runs every metric of the
paper's tables in the authors' protocol, and prints them beside the paper's numbers
(`OUT/paper.md`, `OUT/paper.json`). A metric whose weights are missing is skipped and the reason
is printed; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unix.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("paper", help="the paper's report and image tables from a weights folder and MIMIC-CXR")
    p.add_argument("--weights", required=True, help="weights folder to evaluate (e.g. weights/UniX)")
    p.add_argument("--mimic", required=True, help="MIMIC-CXR-JPG root: the test file's and real CSV's image paths are relative to it")
    p.add_argument("--test-file", help="the authors' understanding test file (test_data.json); omit to skip reports")
    p.add_argument("--gen-prompts", help="the authors' generation-prompt CSV (annotated_prompt, synthetic_filename); omit to skip images")
    p.add_argument("--real-csv", help="real images: CSV with path + annotated_prompt (default: --gen-prompts when it has `path`)")
    p.add_argument("--out", default="runs/paper", help="run folder: reports, images, tables (default: runs/paper)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes in px (the paper: 512 and 256; default 512)")
    p.add_argument("--limit", type=int, help="only the first N test items, prompts and real images (a quick subset)")
    p.add_argument("--seed", type=int, default=0, help="image k of the prompt file is drawn with seed + k (default 0)")
    p.add_argument("--max-new-tokens", type=int,
                   help="report length cap (default: the weights folder's setting, 499 for the release); a quick check only")
    p.add_argument("--batch-size", type=int, default=8, help="reports or images per forward (default 8)")
    p.add_argument("--metric-weights", default="weights", help="folder holding chexbert/, rad-dino/, radgraph/, biovil-t/ (default: weights)")
    p.add_argument("--labeler", choices=["auto", "chexbert", "rule"], default="auto",
                   help="clinical F1 labeller; auto: CheXbert when its weights are there, else the rule labeller (not comparable)")
    p.add_argument("--image-protocol", choices=["release", "exact"], default="release",
                   help="release: the authors' (4 shards, each rounded to 3 decimals); exact: full precision")
    p.add_argument("--image-shards", type=int, default=4, help="shards of the image metrics (the paper: 4; fewer for --limit runs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="reuse --out even if it holds outputs of other weights/settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_paper)


def _inputs(args):
    from unix.data.release_files import read_generation_prompts, read_test_file

    if not args.test_file and not args.gen_prompts:
        raise UserError("nothing to evaluate: give --test-file (reports) and/or --gen-prompts (images)")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not Path(args.mimic).is_dir():
        raise UserError(f"--mimic {args.mimic}: no such folder")
    tests = read_test_file(args.test_file, args.limit) if args.test_file else []
    all_prompts = read_generation_prompts(args.gen_prompts) if args.gen_prompts else []
    seeds = {it.id: args.seed + k for k, it in enumerate(all_prompts)}  # a --limit subset draws the same images
    prompts = all_prompts[: args.limit] if args.limit else all_prompts
    return tests, prompts, seeds


def _record(args) -> dict:
    """What the outputs are made with: a rerun with anything else here would mix two runs' outputs."""
    import dataclasses

    from unix.infer.images import ImageSettings
    from unix.infer.pipeline import read_sampling_defaults, resolve_weights
    from unix.weights.folder import is_released, read_model_config
    from unix.weights.inference import resolve_inference

    folder = resolve_weights(args.weights)
    given = {"max_new_tokens": args.max_new_tokens}
    inference = resolve_inference(folder, read_model_config(folder), is_released(folder), given).record()
    sampling = {**dataclasses.asdict(ImageSettings()), **read_sampling_defaults(folder)}
    sampling.pop("size")
    return {"weights": str(folder.resolve()), "inference": inference, "sampling": sampling, "seed": args.seed,
            "dtype": args.dtype, "test_file": str(Path(args.test_file).resolve()) if args.test_file else None,
            "gen_prompts": str(Path(args.gen_prompts).resolve()) if args.gen_prompts else None}


def _run_lines(args, record: dict, tests, prompts) -> list[str]:
    inf = record["inference"]
    settings = ", ".join(f"{k} {inf[k]} ({inf['sources'][k]})" for k in inf if k != "sources")
    lines = [f"weights {record['weights']}: {settings}"]
    if tests:
        lines.append(f"reports: {len(tests)} test images{' (--limit)' if args.limit else ''}, each with its own instruction")
    if prompts:
        s = record["sampling"]
        lines.append(f"images: {len(prompts)} prompts{' (--limit)' if args.limit else ''} at {', '.join(map(str, args.sizes))} px; "
                     f"{s['steps']} steps, guidance {s['guidance']} in {tuple(s['interval'])}, shift {s['shift']}; "
                     f"prompt k drawn with seed {args.seed} + k; image metrics: protocol {args.image_protocol}")
    return lines


def cmd_paper(args) -> int:
    from unix.eval.paper import compare, markdown
    from unix.eval.paper_metrics import image_results, report_results
    from unix.eval.paper_run import RunContext, check_run_record, write_authors_csvs, write_images, write_reports
    from unix.infer.io import atomic_write

    tests, prompts, seeds = _inputs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = _record(args)
    check_run_record(out, record, args.overwrite)
    ctx = RunContext(out, Path(args.mimic), args.batch_size, args.quiet)

    pipe = None

    def get_pipe():  # loaded on first need: a finished run rescored never loads the model
        nonlocal pipe
        if pipe is None:
            from unix.infer import load_pipeline

            pipe = load_pipeline(args.weights, args.device, args.dtype)
        return pipe

    reports = {}
    if tests:
        from unix.infer import ReportSettings

        reports = write_reports(ctx, tests, get_pipe, ReportSettings(max_new_tokens=args.max_new_tokens))
    image_paths = {size: write_images(ctx, prompts, seeds, get_pipe, size) for size in args.sizes} if prompts else {}
    write_authors_csvs(out, reports, tests, prompts)
    del pipe  # free the model before the metric models load

    results, notes = {}, _run_lines(args, record, tests, prompts)
    if tests:
        results["reports"] = report_results(args, tests, reports, notes)
    for size, paths in image_paths.items():
        results[f"images_{size}"] = image_results(args, prompts, paths, notes)
    rows = compare(results, list(image_paths))
    table = markdown(rows, notes)
    atomic_write(out / "paper.json", json.dumps({"table": rows, "notes": notes, "results": results}, indent=2, default=str) + "\n")
    atomic_write(out / "paper.md", table)
    print(table)
    print(f"wrote {out / 'paper.md'} and {out / 'paper.json'}")
    return 0
