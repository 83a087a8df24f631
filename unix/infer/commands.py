"""`unix report` and `unix generate`: thin wrappers over `unix.infer`.

Every number a user gives is checked here, before the model loads, with one line naming the
option; the weights are checked for non-finite values once loaded (a damaged folder would
otherwise give empty reports or black images with exit 0)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from unix.cli import check_number, check_seed
from unix.errors import UserError

MAX_STEPS = 10_000  # schedule points at most (the release uses 50); more only burns time


def add_common(p) -> None:
    p.add_argument("--weights", help="weights folder (default: the embedded phantom-tiny demo model)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward (default: 8)")
    # The weights folder's inference settings apply unless one of these is given (unix weights check shows them).
    p.add_argument("--double-bos", action=argparse.BooleanOptionalAction,
                   help="feed BOS twice before each text segment, as the release does (default: the weights folder's; off for ours)")
    p.add_argument("--connector-act", "--connector-gelu", dest="connector_act", choices=["gelu", "gelu_tanh"],
                   help="connector activation (default: the weights folder's; gelu_tanh for the release)")
    p.add_argument("--step-capture", choices=["auto", "eager", "graph", "compile"],
                   help="how each denoising step / decoded token runs: auto = CUDA graph on CUDA, eager on CPU (default); "
                        "compile = torch.compile (slow start, faster steps)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notices (warnings and errors still show)")


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write radiology reports for chest X-rays")
    p.add_argument("inputs", nargs="+", help="image files (PNG/JPG/TIFF/DICOM), folders, CSV/JSONL lists with a 'path' "
                   "(optional 'id', 'instruction') column, or the authors' test JSON")
    p.add_argument("--image-root", help="folder that relative paths in lists are read under (default: the list's folder)")
    p.add_argument("--instruction", help="one instruction for every image, also those whose list gives one "
                   "(default: the list's per-image instruction, else the paper's FINDINGS and IMPRESSION instruction)")
    p.add_argument("--max-new-tokens", type=int, help="most report tokens after the start token, EOS not counted "
                   "(default: the weights folder's; 499 for the release, 500 for ours)")
    p.add_argument("--resize", choices=["letterbox", "thumbnail"], help="how an X-ray becomes the square ViT input "
                   "(default: the weights folder's; thumbnail for the release, letterbox for ours)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); sampling temperature when > 0")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] when temperature > 0 (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2^63-1 (default: 0)")
    p.add_argument("--out", help="JSONL or CSV file for the reports (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_common(p)
    p.set_defaults(handler=cmd_report)

    p = subparsers.add_parser("generate", help="draw chest X-rays from text prompts")
    p.add_argument("prompts", nargs="*", help="prompt text(s)")
    p.add_argument("--prompts-file", help="CSV/JSONL with 'prompt' (or 'report'), optional 'id' and 'seed'; or the "
                   "authors' CSV ('annotated_prompt', 'synthetic_filename' names the output)")
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt; image r of prompt ID is ID_r.png (default: 1)")
    # Sampling defaults: the weights folder's sampling.json where it has one, else the release's values.
    p.add_argument("--steps", type=int, help="schedule points, at least 2 (steps-1 Euler moves; default: sampling.json, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (1 = off; default: sampling.json, else 2.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only while the shifted t is in (LO, HI], 0 <= LO <= HI <= 1 (default: sampling.json, else 0.4 1.0)")
    p.add_argument("--shift", type=float, help="timestep shift of the schedule, > 0 (default: sampling.json, else 3.0)")
    p.add_argument("--size", type=int, help="output side in px (default: 512, or the model's largest if smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k unless the file gives seeds")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    add_common(p)
    p.set_defaults(handler=cmd_generate)


def _pipeline(args):
    from unix.infer import load_pipeline

    logger = logging.getLogger("unix")
    level = logger.level
    if args.quiet:  # the demo-model notice and other info lines; warnings still show
        logger.setLevel(logging.WARNING)
    try:
        pipe = load_pipeline(args.weights, args.device, args.dtype, double_bos=args.double_bos, connector_act=args.connector_act,
                             max_new_tokens=getattr(args, "max_new_tokens", None), resize=getattr(args, "resize", None),
                             step_capture=args.step_capture)
    finally:
        logger.setLevel(level)
    check_finite(pipe.model, pipe.folder)
    return pipe


def check_finite(module, folder) -> None:
    """A UserError naming the weights folder and the first tensor holding NaN or infinity."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{folder}: the weights hold NaN or infinite values ({name}); the folder is damaged")


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def instructions_for(items, flag: str | None) -> list[tuple[str, str]]:
    """(instruction, where it came from) per item: --instruction, else the item's own, else the default."""
    from unix.tokenizer import REPORT_INSTRUCTION

    if flag is not None:
        if not flag.strip():
            raise UserError("--instruction is empty")
        return [(flag, "flag")] * len(items)
    return [(it.instruction, "input") if it.instruction else (REPORT_INSTRUCTION, "default") for it in items]


def check_report_args(args) -> None:
    check_number("--batch-size", args.batch_size, least=1)
    check_number("--temperature", args.temperature, least=0.0)
    check_number("--top-p", args.top_p, above=0.0, most=1.0)
    check_number("--max-new-tokens", args.max_new_tokens, least=1)
    check_seed("--seed", args.seed)


def cmd_report(args) -> int:
    from unix.infer import ReportSettings
    from unix.infer.domain import far_from_training, read_input_stats
    from unix.infer.io import expand_inputs, read_image, write_rows

    check_report_args(args)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists (use --overwrite or another --out)")
    items = expand_inputs(args.inputs, args.image_root)
    instructions = instructions_for(items, args.instruction)
    pipe = _pipeline(args)
    if args.max_new_tokens is not None and args.max_new_tokens >= pipe.cfg.lm.max_position:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context ({pipe.cfg.lm.max_position} positions)")
    settings = ReportSettings(max_new_tokens=pipe.inference.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    stats = read_input_stats(pipe.folder)
    rows: list[dict | None] = [None] * len(items)
    good, far = [], {}
    for k, it in enumerate(items):  # unreadable images get their own row and the rest go on
        try:
            image = read_image(it.path)
        except UserError as e:
            rows[k] = {"id": it.id, "path": it.path, "instruction": instructions[k][0], "report": None, "error": str(e)}
            continue
        good.append(k)
        far[k] = None if stats is None else far_from_training(image, stats)
        if far[k]:
            print(f"unix: warning: {it.path}: far from the images {pipe.folder.name} was trained on: {'; '.join(far[k])}; "
                  "its report may mean nothing", file=sys.stderr)
    try:
        _write_reports(args, pipe, settings, items, instructions, good, far, rows)
    finally:  # interrupted or failed: the reports already written are kept
        done = [r for r in rows if r is not None]
        if args.out and len(done) < len(rows) and done:
            write_rows(args.out, done)
            print(f"unix: stopped early; {len(done)} of {len(rows)} rows written to {args.out}", file=sys.stderr)
    failed = [r for r in rows if r.get("error")]
    if args.out:
        write_rows(args.out, rows)
    elif len(items) == 1 and not failed:
        print(rows[0]["report"])
    else:
        for r in rows:
            print(json.dumps(r))
    for r in failed:
        print(f"unix: error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _write_reports(args, pipe, settings, items, instructions, good, far, rows) -> None:
    """Fill rows[k] for every k in `good`, a batch at a time; an image that fails on its own gets an error row."""
    from tqdm import tqdm

    record = pipe.inference.record()
    bar = tqdm(total=len(good), desc="reports", unit="img", disable=args.quiet or len(good) < 2)
    for chunk in _chunks(good, args.batch_size):
        t0 = time.perf_counter()
        try:
            texts = pipe.reports([items[k].path for k in chunk], settings, [instructions[k][0] for k in chunk])
        except UserError as e:
            texts = [e] if len(chunk) == 1 else [_one_report(pipe, items[k].path, settings, instructions[k][0]) for k in chunk]
        dt = (time.perf_counter() - t0) / len(chunk)
        for k, text in zip(chunk, texts):
            it, (instruction, source) = items[k], instructions[k]
            if isinstance(text, UserError):  # this image alone failed (the others of its batch were redone one by one)
                rows[k] = {"id": it.id, "path": it.path, "instruction": instruction, "report": None, "error": str(text)}
                continue
            used = {**record, "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                    "weights": str(pipe.folder), "sources": {**record["sources"], "instruction": source}}
            rows[k] = {"id": it.id, "path": it.path, "instruction": instruction, "report": text, "seconds": round(dt, 4),
                       "out_of_domain": far[k], **({"reference": it.reference} if it.reference is not None else {}),
                       "settings": used}
        bar.update(len(chunk))
    bar.close()


def _one_report(pipe, path, settings, instruction):
    try:
        return pipe.reports([path], settings, [instruction])[0]
    except UserError as e:
        return e


# --- unix generate ------------------------------------------------------------------------------

def _seed_of(value, where: str) -> int:
    """A prompts file's seed cell (an int, a whole float from JSON, or digits in CSV) as an int."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: seed {value!r} is not a whole number")
    check_seed(f"{where}: seed", value)
    return value


def read_prompts_file(path: str) -> list[dict]:
    """Jobs {id, prompt[, seed], where} from our CSV/JSONL, or from the authors' generation-prompt CSV
    (its `synthetic_filename` without suffix is the id, so the output files carry its names)."""
    from unix.data.release_files import PROMPT_COLUMN, read_generation_prompts
    from unix.infer.io import read_table

    rows = read_table(path)
    if Path(path).suffix.lower() == ".csv" and rows and PROMPT_COLUMN in rows[0] and "prompt" not in rows[0]:
        return [{"id": it.id, "prompt": it.prompt, "where": f"{path}: line {n + 2}"} for n, it in enumerate(read_generation_prompts(path))]
    jobs = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is not an object")
        text = row.get("prompt") or row.get("report")
        if not text or not str(text).strip():
            raise UserError(f"{where} has no 'prompt'")
        job = {"id": str(row.get("id") or f"row{i:04d}"), "prompt": str(text), "where": where}
        if row.get("seed") not in (None, ""):
            job["seed"] = _seed_of(row["seed"], where)
        jobs.append(job)
    return jobs


def read_prompts(args) -> list[dict]:
    """One job {id, prompt, seed, where} per image to draw; ids are checked as file names and unique."""
    from unix.infer.io import check_file_name

    jobs = [{"id": f"prompt{i:03d}", "prompt": p, "where": f"prompt {i + 1}"} for i, p in enumerate(args.prompts)]
    if args.prompts_file:
        jobs += read_prompts_file(args.prompts_file)
    if not jobs:
        raise UserError("give at least one prompt (arguments or --prompts-file)")
    for j in jobs:
        if not j["prompt"].strip():
            raise UserError(f"{j['where']}: the prompt is empty")
    out, k, seen = [], 0, {}
    for j in jobs:
        for r in range(args.num_per_prompt):
            seed = j["seed"] + r if "seed" in j else args.seed + k
            name = check_file_name(j["id"] if args.num_per_prompt == 1 else f"{j['id']}_{r}", j["where"])
            key = name.casefold()  # case-insensitive file systems would merge A.png and a.png
            if key in seen:
                raise UserError(f"{j['where']}: output name {name!r} is also that of {seen[key]}: one image would overwrite the other")
            seen[key] = j["where"]
            check_seed(f"{j['where']}: seed + {r}" if "seed" in j else f"--seed + {k} (image {k + 1})", seed)
            out.append({"id": name, "prompt": j["prompt"], "seed": seed, "where": j["where"]})
            k += 1
    return out


def check_generate_args(args) -> None:
    check_number("--batch-size", args.batch_size, least=1)
    check_number("--num-per-prompt", args.num_per_prompt, least=1)
    check_number("--steps", args.steps, least=2, most=MAX_STEPS)
    check_number("--guidance", args.guidance, least=0.0)
    check_number("--shift", args.shift, above=0.0)
    check_number("--size", args.size, least=1)
    for bound in args.guidance_interval or ():
        check_number("--guidance-interval", bound, least=0.0, most=1.0)
    if args.guidance_interval and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance-interval: LO {args.guidance_interval[0]} is above HI {args.guidance_interval[1]}")
    check_seed("--seed", args.seed)


def check_image_settings(settings, folder: Path) -> None:
    """The settings after the folder's sampling.json filled what no flag gave: its values are checked too."""
    where = f"{folder}/sampling.json"
    check_number(f"{where}: steps", settings.steps, least=2, most=MAX_STEPS)
    check_number(f"{where}: guidance", settings.guidance, least=0.0)
    check_number(f"{where}: shift", settings.shift, above=0.0)
    lo, hi = settings.interval
    check_number(f"{where}: interval", lo, least=0.0, most=1.0)
    check_number(f"{where}: interval", hi, least=lo, most=1.0)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from unix.infer.io import atomic_write, png_bytes

    check_generate_args(args)
    jobs = read_prompts(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not args.overwrite:
        for j in jobs:
            for suffix in (".png", ".json"):
                if (out / f"{j['id']}{suffix}").exists():
                    raise UserError(f"{out / (j['id'] + suffix)} exists (use --overwrite or another --out)")
    manifest = Manifest(out / "manifest.jsonl")
    pipe = _pipeline(args)
    size = args.size if args.size is not None else min(512, pipe.cfg.max_image_size)
    settings = pipe.image_settings(size=size, steps=args.steps, guidance=args.guidance, shift=args.shift,
                                   interval=tuple(args.guidance_interval) if args.guidance_interval else None)
    check_image_settings(settings, pipe.folder)
    try:
        pipe.cfg.token_grid(size)
    except ValueError as e:
        raise UserError(f"--size: {e}") from None
    room = pipe.cfg.lm.max_position - 1  # the image block takes one position after the prompt
    for j in jobs:
        n = len(pipe.tokenizer.segment(j["prompt"]))
        if n > room:
            raise UserError(f"{j['where']}: the prompt has {n} tokens, more than the context allows ({room})")
    check_finite(pipe.codec, pipe.folder)
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=args.quiet or len(jobs) < 2)
    written = []
    for chunk in _chunks(jobs, args.batch_size):
        t0 = time.perf_counter()
        images = pipe.images([j["prompt"] for j in chunk], [j["seed"] for j in chunk], settings)
        dt = (time.perf_counter() - t0) / len(chunk)
        rows = []
        for j, img in zip(chunk, images):
            path = out / f"{j['id']}.png"
            atomic_write(path, png_bytes(img))
            side = {"id": j["id"], "prompt": j["prompt"], "seed": j["seed"], "path": str(path), "seconds": round(dt, 4),
                    "size": size, "steps": settings.steps, "guidance": settings.guidance, "shift": settings.shift,
                    "guidance_interval": list(settings.interval), "double_bos": pipe.inference.double_bos,
                    "double_bos_from": pipe.inference.sources["double_bos"], "weights": str(pipe.folder)}
            atomic_write(path.with_suffix(".json"), json.dumps(side, indent=1))
            rows.append(side)
        manifest.add(rows)  # after every batch: an interrupted run keeps the record of what it finished
        written += rows
        bar.update(len(chunk))
    bar.close()
    for m in written:
        print(m["path"])
    return 0


class Manifest:
    """`manifest.jsonl` of an output folder: one row per image file, kept across runs. A new row
    replaces the row of the same file name (a run with --overwrite) and every other row stays."""

    def __init__(self, path: Path):
        from unix.infer.io import read_table

        self.path = path
        rows = read_table(path) if path.is_file() else []  # a damaged manifest stops the run before any work
        if not all(isinstance(r, dict) and r.get("path") for r in rows):
            raise UserError(f"{path}: a row has no 'path' (not a manifest written by unix generate)")
        self.rows = {Path(r["path"]).name: r for r in rows}

    def add(self, rows: list[dict]) -> None:
        from unix.infer.io import atomic_write

        for r in rows:
            name = Path(r["path"]).name
            self.rows.pop(name, None)  # a replaced file's row moves to the end
            self.rows[name] = r
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))
