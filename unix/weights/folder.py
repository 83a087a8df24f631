"""Weights folders: the released `weights/UniX/` layout and our own exports.

Both keep the transformer in `model.safetensors` under the released tensor names, so one strict
loader serves both. Our folders add `config.json` with the full model config under "unix_model";
a released folder's `config.json` has none, and the `unix` preset applies.

    model.safetensors       decoder, vision tower, connector, generation heads
    config.json             {"unix_model": {...}} (ours) or the release's config
    inference.json          optional: how to run it (unix/weights/inference.py)
    vae/kl-f16d16.ckpt      released VAE (LDM format), or vae/model.safetensors (ours, diffusers names)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unix.config import ConfigError, ModelConfig, from_dict, load_model_config, to_dict
from unix.errors import UserError
from unix.weights.inference import InferenceSettings, resolve_inference
from unix.weights.released import LoadReport, load_released_state_dict, match_state_dict, to_released

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VAE_FILES = ("vae/model.safetensors", "vae/kl-f16d16.ckpt")


def read_config_json(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE} (a weights folder needs one)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def is_released(folder: str | Path) -> bool:
    """True for the authors' release: its config.json is theirs, without our "unix_model" key."""
    return "unix_model" not in read_config_json(Path(folder))


def read_model_config(folder: Path) -> ModelConfig:
    raw = read_config_json(folder)
    if "unix_model" in raw:
        try:
            return from_dict(ModelConfig, raw["unix_model"])
        except ConfigError as e:
            raise UserError(f"{folder / CONFIG_FILE}: {e}") from None
    return load_model_config("unix")  # the released folder: its sizes are the `unix` preset


def file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as an empty meta tensor of its shape (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


@dataclass
class FolderCheck:
    folder: Path
    config: ModelConfig | None = None
    tensors: LoadReport | None = None
    vae: str | None = None  # which VAE file is present
    inference: InferenceSettings | None = None  # the settings `unix report` / `unix generate` apply
    problems: list[str] = field(default_factory=list)

    @property
    def loadable(self) -> bool:
        return not self.problems and self.tensors is not None and self.tensors.ok


def check_folder(folder: str | Path) -> FolderCheck:
    """Inspect a weights folder without loading tensor data."""
    from unix.models.unix import UniX

    folder = Path(folder)
    check = FolderCheck(folder)
    if not folder.is_dir():
        check.problems.append(f"{folder}: not a directory")
        return check
    try:
        check.config = read_model_config(folder)
        check.inference = resolve_inference(folder, check.config, is_released(folder))
    except UserError as e:
        check.problems.append(str(e))
        if check.config is None:
            return check
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        check.problems.append(f"{model_path}: missing")
        return check
    with torch.device("meta"):
        model = UniX(check.config)
    try:
        _, check.tensors = match_state_dict(model, file_shapes(model_path))
    except UserError as e:
        check.problems.append(str(e))
    check.vae = next((v for v in VAE_FILES if (folder / v).is_file()), None)
    return check


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, allow_partial: bool = False):
    """Build UniX from a weights folder and load it strictly. Returns (model, LoadReport)."""
    from unix.models.unix import UniX

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"weights folder not found: {folder}")
    cfg = read_model_config(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing (the weights folder has no model file)")
    with torch.device("meta"):
        model = UniX(cfg)
    model = model.to_empty(device="cpu")
    model.reset_buffers()
    report = load_released_state_dict(model, load_file(str(path)), allow_partial=allow_partial, source=str(path))
    return model.to(device=device, dtype=dtype).eval(), report


def save_model(model, folder: str | Path, extra_files: dict[str, bytes] | None = None, state_dict: dict | None = None) -> Path:
    """Write model.safetensors (released names) + config.json, atomically: into a temporary
    sibling folder, then renamed into place. An existing folder is replaced only as a whole.
    `state_dict` replaces the model's own (e.g. gathered from FSDP shards, or EMA weights)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_released(sd).items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "producer": "unix"})
    (tmp / CONFIG_FILE).write_text(json.dumps({"unix_model": to_dict(model.cfg)}, indent=2))
    for name, data in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a weights folder should get the usual mode
    publish(tmp, folder)
    return folder


def publish(part: Path, folder: Path) -> None:
    """Rename a finished `part` folder to `folder`, replacing a folder of that name as a whole. If
    this is killed between its two renames, `recover(folder)` (called first by the next publish)
    puts things back."""
    recover(folder)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(part, folder)
    _rmtree(old)


def recover(folder: Path) -> None:
    """Undo what an interrupted `publish` left: a previous folder set aside comes back if the new
    one never took its place, and is deleted if it did."""
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        if folder.exists():
            _rmtree(old)
        else:
            os.replace(old, folder)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
