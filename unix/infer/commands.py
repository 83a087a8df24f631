"""`unix report` and `unix generate`: thin wrappers over `unix.infer`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from unix.errors import UserError


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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notices")


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write radiology reports for chest X-rays")
    p.add_argument("inputs", nargs="+", help="image files (PNG/JPG/DICOM), folders, CSV/JSONL lists with a 'path' "
                   "(optional 'id', 'instruction') column, or the authors' test JSON")
    p.add_argument("--image-root", help="folder that relative paths in lists are read under (default: the list's folder)")
    p.add_argument("--instruction", help="one instruction for every image, also those whose list gives one "
                   "(default: the list's per-image instruction, else the paper's FINDINGS and IMPRESSION instruction)")
    p.add_argument("--max-new-tokens", type=int, help="most report tokens after the start token, EOS not counted "
                   "(default: the weights folder's; 499 for the release, 500 for ours)")
    p.add_argument("--resize", choices=["letterbox", "thumbnail"], help="how an X-ray becomes the square ViT input "
                   "(default: the weights folder's; thumbnail for the release, letterbox for ours)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", help="JSONL or CSV file for the reports (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_common(p)
    p.set_defaults(handler=cmd_report)

    p = subparsers.add_parser("generate", help="draw chest X-rays from text prompts")
    p.add_argument("prompts", nargs="*", help="prompt text(s)")
    p.add_argument("--prompts-file", help="CSV/JSONL with 'prompt' (or 'report'), optional 'id' and 'seed'; or the "
                   "authors' CSV ('annotated_prompt', 'synthetic_filename' names the output)")
    p.add_argument("--num-per-prompt", type=int, default=1)
    # Sampling defaults: the weights folder's sampling.json where it has one, else the release's values.
    p.add_argument("--steps", type=int, help="schedule points (steps-1 Euler moves; default: sampling.json, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off; default: sampling.json, else 2.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only while the shifted t is in (LO, HI] (default: sampling.json, else 0.4 1.0)")
    p.add_argument("--shift", type=float, help="timestep shift of the schedule (default: sampling.json, else 3.0)")
    p.add_argument("--size", type=int, help="output side in px (default: 512, or the model's largest if smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k unless the file gives seeds")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    add_common(p)
    p.set_defaults(handler=cmd_generate)


def _pipeline(args):
    from unix.infer import load_pipeline

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return load_pipeline(args.weights, args.device, args.dtype, double_bos=args.double_bos, connector_act=args.connector_act,
                         max_new_tokens=getattr(args, "max_new_tokens", None), resize=getattr(args, "resize", None))


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


def cmd_report(args) -> int:
    from tqdm import tqdm

    from unix.infer import ReportSettings
    from unix.infer.io import expand_inputs, read_image, write_rows

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} exists (use --overwrite or another --out)")
    items = expand_inputs(args.inputs, args.image_root)
    instructions = instructions_for(items, args.instruction)
    pipe = _pipeline(args)
    settings = ReportSettings(max_new_tokens=pipe.inference.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    record = pipe.inference.record()
    rows: list[dict | None] = [None] * len(items)
    good = []
    for k, it in enumerate(items):  # unreadable images get their own row and the rest go on
        base = {"id": it.id, "path": it.path, "instruction": instructions[k][0]}
        try:
            read_image(it.path)
            good.append(k)
        except UserError as e:
            rows[k] = {**base, "report": None, "error": str(e)}
    bar = tqdm(total=len(good), desc="reports", unit="img", disable=args.quiet or len(good) < 2)
    for chunk in _chunks(good, args.batch_size):
        t0 = time.perf_counter()
        texts = pipe.reports([items[k].path for k in chunk], settings, [instructions[k][0] for k in chunk])
        dt = (time.perf_counter() - t0) / len(chunk)
        for k, text in zip(chunk, texts):
            it, (instruction, source) = items[k], instructions[k]
            used = {**record, "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                    "weights": str(pipe.folder), "sources": {**record["sources"], "instruction": source}}
            rows[k] = {"id": it.id, "path": it.path, "instruction": instruction, "report": text, "seconds": round(dt, 4),
                       **({"reference": it.reference} if it.reference is not None else {}), "settings": used}
        bar.update(len(chunk))
    bar.close()
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


def read_prompts_file(path: str) -> list[dict]:
    """Jobs {id, prompt[, seed]} from our CSV/JSONL, or from the authors' generation-prompt CSV
    (its `synthetic_filename` without suffix is the id, so the output files carry its names)."""
    from unix.data.release_files import PROMPT_COLUMN, read_generation_prompts
    from unix.infer.io import read_table

    rows = read_table(path)
    if Path(path).suffix.lower() == ".csv" and rows and PROMPT_COLUMN in rows[0] and "prompt" not in rows[0]:
        return [{"id": it.id, "prompt": it.prompt} for it in read_generation_prompts(path)]
    jobs = []
    for i, row in enumerate(rows):
        text = row.get("prompt") or row.get("report")
        if not text or not str(text).strip():
            raise UserError(f"{path}: row {i + 1} has no 'prompt'")
        job = {"id": str(row.get("id") or f"row{i:04d}"), "prompt": str(text)}
        if row.get("seed") not in (None, ""):
            job["seed"] = int(row["seed"])
        jobs.append(job)
    return jobs


def read_prompts(args) -> list[dict]:
    jobs = [{"id": f"prompt{i:03d}", "prompt": p} for i, p in enumerate(args.prompts)]
    if args.prompts_file:
        jobs += read_prompts_file(args.prompts_file)
    if not jobs:
        raise UserError("give at least one prompt (arguments or --prompts-file)")
    for j in jobs:
        if not j["prompt"].strip():
            raise UserError(f"prompt {j['id']} is empty")
    if args.num_per_prompt < 1:
        raise UserError("--num-per-prompt must be at least 1")
    out, k = [], 0
    for j in jobs:
        for r in range(args.num_per_prompt):
            seed = j["seed"] + r if "seed" in j else args.seed + k
            name = j["id"] if args.num_per_prompt == 1 else f"{j['id']}_{r}"
            out.append({"id": name, "prompt": j["prompt"], "seed": seed})
            k += 1
    return out


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from unix.infer.io import atomic_write, png_bytes, write_rows

    jobs = read_prompts(args)
    out = Path(args.out)
    if not args.overwrite:
        taken = [j["id"] for j in jobs if (out / f"{j['id']}.png").exists()]
        if taken:
            raise UserError(f"{out / (taken[0] + '.png')} exists (use --overwrite or another --out)")
    pipe = _pipeline(args)
    size = args.size or min(512, pipe.cfg.max_image_size)
    settings = pipe.image_settings(size=size, steps=args.steps, guidance=args.guidance, shift=args.shift,
                                   interval=tuple(args.guidance_interval) if args.guidance_interval else None)
    try:
        pipe.cfg.token_grid(size)
    except ValueError as e:
        raise UserError(f"--size: {e}") from None
    room = pipe.cfg.lm.max_position - 1  # the image block takes one position after the prompt
    for j in jobs:
        n = len(pipe.tokenizer.segment(j["prompt"]))
        if n > room:
            raise UserError(f"prompt {j['id']} has {n} tokens, more than the context allows ({room})")
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=args.quiet or len(jobs) < 2)
    manifest = []
    for chunk in _chunks(jobs, args.batch_size):
        t0 = time.perf_counter()
        images = pipe.images([j["prompt"] for j in chunk], [j["seed"] for j in chunk], settings)
        dt = (time.perf_counter() - t0) / len(chunk)
        for j, img in zip(chunk, images):
            path = out / f"{j['id']}.png"
            atomic_write(path, png_bytes(img))
            side = {**j, "path": str(path), "seconds": round(dt, 4), "size": size, "steps": settings.steps,
                    "guidance": settings.guidance, "shift": settings.shift, "guidance_interval": list(settings.interval),
                    "double_bos": pipe.inference.double_bos, "double_bos_from": pipe.inference.sources["double_bos"],
                    "weights": str(pipe.folder)}
            atomic_write(path.with_suffix(".json"), json.dumps(side, indent=1))
            manifest.append(side)
        bar.update(len(chunk))
    bar.close()
    if len(manifest) > 1:
        write_rows(out / "manifest.jsonl", manifest)
    for m in manifest:
        print(m["path"])
    return 0
