"""`unix weights ...`: describe and check weights folders."""

from __future__ import annotations

import json
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
    print("loadable" if check.loadable else "NOT loadable")
    if not check.loadable:
        raise UserError(f"{check.folder}: weights folder is not loadable (see above)")
    return 0
