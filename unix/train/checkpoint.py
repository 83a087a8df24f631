"""Checkpoints: each one is a loadable weights folder plus the training state, written atomically.

    OUT/checkpoints/step-0000500/   model.safetensors (the trained weights, not the EMA), config.json,
                                    tokenizer files, vae/, train.json, train_state.pt
    OUT/final/                      the exported weights folder (EMA weights when EMA is on),
                                    tokenizer files, vae/model.safetensors, train.json

`train_state.pt` holds optimizer, EMA, step, data position and RNG state; it is our own file and
loads with `weights_only=True`.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from unix.train.parallel import is_sharded
from unix.weights.folder import save_model
from unix.weights.released import load_released_state_dict

STEP_DIR = re.compile(r"^step-(\d{7})$")


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts; under FSDP2 gathered on every rank."""
    if dist.is_initialized() and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if dist.is_initialized() and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.pt").is_file())


def save_checkpoint(out: Path, step: int, model, optimizer, train_state: dict, keep_last: int, main: bool,
                    files: dict[str, bytes] | None = None) -> None:
    """`files`: the side files that make the folder loadable (tokenizer, VAE, train.json)."""
    model_sd, optim_sd = full_state(model, optimizer)  # collective: every rank takes part
    if not main:
        return
    buf = io.BytesIO()
    torch.save({**train_state, "optimizer": optim_sd, "step": step}, buf)
    files = {**(files or {}), "train_state.pt": buf.getvalue()}
    save_model(model, out / "checkpoints" / f"step-{step:07d}", files, state_dict=model_sd)
    for old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model) -> dict:
    """Model weights into the (not yet sharded) model; returns the training state."""
    from safetensors.torch import load_file

    load_released_state_dict(model, load_file(str(path / "model.safetensors")), source=str(path))
    return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)

