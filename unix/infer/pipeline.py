"""The Python API the CLI wraps: load a weights folder once, then write reports and draw X-rays.

    from unix.infer import load_pipeline
    pipe = load_pipeline("weights/UniX", device="cuda")  # the folder's inference settings apply (pipe.inference)
    reports = pipe.reports(["cxr.png"])
    reports = pipe.reports(["a.png", "b.png"], instructions=["Provide the FINDINGS.", "Describe the FINDINGS and IMPRESSION."])
    images = pipe.images(["Small left pleural effusion."], seeds=[0])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unix.config import ModelConfig
from unix.errors import UserError
from unix.infer.images import ImageSettings, sample_latents
from unix.infer.io import fit_image, read_image
from unix.infer.reports import ReportSettings, generate_report_ids
from unix.models.vision import normalize_pixels
from unix.tokenizer import Tokenizer
from unix.weights.folder import VAE_FILES, is_released, load_model, read_model_config
from unix.weights.inference import InferenceSettings, resolve_inference

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "phantom-tiny"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Optional, in a weights folder: the image sampling defaults that model was measured best with
# (like transformers' generation_config.json). Command-line values still win.
SAMPLING_FILE = "sampling.json"
CAPTURE_MODES = typing.get_args(typing.get_type_hints(ModelConfig)["step_capture"])
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(ImageSettings) if f.name != "size")  # size is the caller's


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_sampling_defaults(folder: Path) -> dict:
    """The folder's `sampling.json` as ImageSettings fields ({} when absent); a bad file is a UserError naming it."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    out = {}
    for key, value in raw.items():
        if key not in SAMPLING_KEYS:
            raise UserError(f"{path}: unknown key {key!r} (known: {', '.join(SAMPLING_KEYS)})")
        if key == "interval":
            if not (isinstance(value, list) and len(value) == 2 and all(map(_number, value))):
                raise UserError(f"{path}: {key} = {value!r} is not two numbers")
            out[key] = (float(value[0]), float(value[1]))
        elif key == "steps":
            if not (_number(value) and float(value).is_integer()):
                raise UserError(f"{path}: {key} = {value!r} is not a whole number")
            out[key] = int(value)
        else:
            if not _number(value):
                raise UserError(f"{path}: {key} = {value!r} is not a number")
            out[key] = float(value)
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested, but no CUDA device is available (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


def resolve_weights(path: str | Path | None) -> Path:
    if path:
        return Path(path)
    if (DEFAULT_WEIGHTS / "model.safetensors").is_file():
        log.info("using the embedded demo model weights/phantom-tiny (trained on CXR-Phantom images only)")
        return DEFAULT_WEIGHTS
    raise UserError("no weights: pass --weights DIR (e.g. weights/UniX, see weights/README.md)")


@dataclass
class Pipeline:
    model: torch.nn.Module
    tokenizer: Tokenizer
    folder: Path
    device: torch.device
    dtype: torch.dtype
    sampling: dict = field(default_factory=dict)  # the folder's sampling.json (ImageSettings fields)
    inference: InferenceSettings = field(default_factory=InferenceSettings)  # BOS, connector, report length, resize
    _codec: object = field(default=None, repr=False)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def codec(self):
        """The VAE, loaded on first use (report generation never needs it), on the model's device."""
        if self._codec is None:
            from unix.weights.ldm_vae import load_ldm_vae

            path = next((self.folder / v for v in VAE_FILES if (self.folder / v).is_file()), None)
            if path is None:
                raise UserError(f"{self.folder}: no VAE ({' or '.join(VAE_FILES)}); image generation needs one")
            self._codec = load_ldm_vae(path, self.cfg.vae).to(self.device, self.dtype)
        return self._codec

    def pixels(self, paths: list[str]) -> torch.Tensor:
        """Read, fit (the folder's resize policy) and normalise images for the ViT: (B, 3, S, S)."""
        S = self.cfg.vision.image_size
        arrays = [fit_image(read_image(p), S, self.inference.resize) for p in paths]
        x = torch.from_numpy(np.stack(arrays))[:, None]
        return normalize_pixels(x, self.cfg.vision).to(self.device, self.dtype)

    def reports(self, paths: list[str], settings: ReportSettings | None = None, instructions: list[str] | None = None) -> list[str]:
        """One report per image. `instructions`: one per image (rows may differ; default
        `settings.instruction` for all). `settings.max_new_tokens` None: the folder's setting."""
        settings = settings or ReportSettings()
        if settings.max_new_tokens is None:
            settings = dataclasses.replace(settings, max_new_tokens=self.inference.max_new_tokens)
        if instructions is not None:
            if len(instructions) != len(paths):
                raise UserError(f"{len(instructions)} instructions for {len(paths)} images")
            if not all(isinstance(i, str) and i.strip() for i in instructions):
                raise UserError("an instruction is empty")
        ids = generate_report_ids(self.model, self.tokenizer, self.pixels(paths), settings, instructions)
        return [self.tokenizer.decode(r) for r in ids]

    def image_settings(self, **given) -> ImageSettings:
        """ImageSettings from, in order of precedence: the non-None `given` values, the folder's
        sampling.json, the ImageSettings defaults."""
        return ImageSettings(**{**self.sampling, **{k: v for k, v in given.items() if v is not None}})

    def images(self, prompts: list[str], seeds: list[int], settings: ImageSettings | None = None, on_step=None) -> list[np.ndarray]:
        """Prompts -> uint8 grayscale images (size x size); settings default to `image_settings()`;
        `on_step(done, total)` after each denoising step."""
        settings = settings or self.image_settings()
        for p in prompts:
            if not p.strip():
                raise UserError("empty prompt")
        self.cfg.token_grid(settings.size)
        z = sample_latents(self.model, self.tokenizer, prompts, seeds, settings, on_step)
        x = self.codec.decode(z.to(self.dtype)).float()  # (B, 3, H, W) in about [-1, 1]
        gray = (x / 2 + 0.5).clamp(0, 1).mean(dim=1)
        return [(g * 255).round().to(torch.uint8).cpu().numpy() for g in gray]


def load_pipeline(weights: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                  double_bos: bool | None = None, connector_act: str | None = None,
                  max_new_tokens: int | None = None, resize: str | None = None, step_capture: str | None = None) -> Pipeline:
    """Load model + tokenizer from a weights folder (default: the embedded phantom-tiny model).
    The inference settings are the folder's (its inference.json, the release's values for the
    authors' release, else our defaults: unix/weights/inference.py); non-None arguments win.
    `step_capture`: how sampling and decoding steps run (ModelConfig.step_capture; default "auto":
    CUDA graphs on CUDA, eager elsewhere)."""
    folder = resolve_weights(weights)
    dev = resolve_device(device)
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    if not folder.is_dir():
        raise UserError(f"weights folder not found: {folder}")
    if step_capture is not None and step_capture not in CAPTURE_MODES:
        raise UserError(f"unknown step capture {step_capture!r} ({', '.join(CAPTURE_MODES)})")
    if step_capture == "graph" and dev.type != "cuda":
        raise UserError(f"step capture 'graph' records CUDA graphs; the device is {dev.type} (use compile or eager)")
    given = {"double_bos": double_bos, "connector_act": connector_act, "max_new_tokens": max_new_tokens, "resize": resize}
    inference = resolve_inference(folder, read_model_config(folder), is_released(folder), given)  # before the slow load
    model, _ = load_model(folder, device=dev, dtype=DTYPES[dtype])
    if inference.connector_act != model.cfg.vision.connector_act:
        model.cfg = dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, connector_act=inference.connector_act))
        model.connector.set_act(inference.connector_act)
    if step_capture is not None:
        model.cfg = dataclasses.replace(model.cfg, step_capture=step_capture)
    tokenizer = Tokenizer.from_folder(folder, model.cfg.tokens, double_bos=inference.double_bos)
    return Pipeline(model, tokenizer, folder, dev, DTYPES[dtype], read_sampling_defaults(folder), inference)
