"""`unix weights ...`: describe and check weights folders."""

from __future__ import annotations

import json
import os
import sys

from unix.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="describe, check and convert weights folders")
    sub = parser.add_subparsers(dest="weights_command", metavar="WHAT")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    p = sub.add_parser("layout", help="print the tensor names and shapes of a model preset (built on the meta device)")
    p.add_argument("--preset", default="unix", help="model preset in configs/model/ or a YAML path (default: unix)")
    p.add_argument("--names", choices=["released", "ours"], default="released", help="tensor naming (default: released)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
    p.set_defaults(handler=cmd_layout)

    p = sub.add_parser("check", help="say what a weights folder holds and whether it loads (exit 0 only if loadable)")
    p.add_argument("folder", help="weights folder (model.safetensors + config.json [+ vae/])")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("convert", help="convert a pickle checkpoint (.ckpt/.pth/.bin) to safetensors, weights-only")
    p.add_argument("source", help="checkpoint read with torch.load(weights_only=True)")
    p.add_argument("dest", help="output .safetensors file")
    p.add_argument("--key", help="take the tensors under this key (default: 'state_dict' or 'model_state_dict' if present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=cmd_convert)


def cmd_layout(args) -> int:
    import torch

    from unix.config import load_model_config
    from unix.models.unix import UniX
    from unix.weights.released import released_layout

    cfg = load_model_config(args.preset, args.overrides)
    with torch.device("meta"):
        model = UniX(cfg)
    if args.names == "released":
        layout = released_layout(model)
    else:
        layout = {"tensors": {k: list(v.shape) for k, v in model.state_dict().items()}}
    layout["num_parameters"] = sum(v.numel() for v in model.state_dict().values())
    json.dump(layout, sys.stdout, indent=1)
    print()
    return 0


def cmd_check(args) -> int:
    from unix.weights.folder import check_folder

    check = check_folder(args.folder)
    print(f"weights folder: {check.folder}")
    for problem in check.problems:
        print(f"  problem: {problem}")
    if check.config is not None:
        print(f"  config: {check.config.name} ({check.config.lm.num_layers} layers, hidden {check.config.lm.hidden_size})")
    report = check.tensors
    if report is not None:
        n_ok = "all" if report.ok else "NOT all"
        print(f"  model tensors: {n_ok} present with the right shape")
        for label, items in (("missing", report.missing), ("unexpected", report.unexpected), ("wrong shape", report.wrong_shape)):
            for name in items:
                print(f"    {label}: {name}")
        if report.ignored:
            print(f"  ignored (unused by the model): {len(report.ignored)} tensors")
        for name in report.fixed_checked:
            print(f"  fixed table present and checked: {name}")
    print(f"  vae: {check.vae or 'absent (image generation needs vae/kl-f16d16.ckpt or vae/model.safetensors)'}")
    if check.inference is not None:
        print("  inference settings (flags still win):")
        for key, value in check.inference.record().items():
            if key != "sources":
                print(f"    {key} = {json.dumps(value)}  ({check.inference.sources[key]})")
    print("loadable" if check.loadable else "NOT loadable")
    if not check.loadable:
        raise UserError(f"{check.folder}: weights folder is not loadable (see above)")
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    src, dest = Path(args.source), Path(args.dest)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    if dest.exists() and not args.overwrite:
        raise UserError(f"{dest} exists (use --overwrite)")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{src}: cannot be read with weights_only=True ({str(e).splitlines()[0]})") from None
    key = args.key or next((k for k in ("state_dict", "model_state_dict") if isinstance(obj, dict) and k in obj), None)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise UserError(f"{src}: no key {key!r}")
        obj = obj[key]
    tensors = {k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"{src}: holds no tensors")
    skipped = len(obj) - len(tensors)
    tmp = dest.with_name(f".{dest.name}.tmp")  # written beside, then renamed: never a partial file
    save_file(tensors, str(tmp))
    os.replace(tmp, dest)
    print(f"{dest}: {len(tensors)} tensors" + (f" ({skipped} non-tensor entries skipped)" if skipped else ""))
    return 0
