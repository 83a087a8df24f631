"""How a weights folder is meant to be run: its optional `inference.json`, and the release's settings.

The authors ran their released model with a few choices that differ from how it was trained
(reference/unix-compat.md 1.6, 3.2, 3.3, 5.4). A folder declares such choices itself, so that
`unix report --weights weights/UniX` reproduces the authors with no flags while models trained
here keep clean defaults. Each setting comes from the first of:

    flag        a command-line flag (or a `load_pipeline` argument)
    inference.json  the folder's own file
    release     the release's value, when the folder is the authors' release (config.json without "unix_model")
    config.json the model config (the connector activation of our own folders)
    default     our default
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args

from unix.config import ModelConfig
from unix.errors import UserError

INFERENCE_FILE = "inference.json"

ConnectorAct = Literal["gelu", "gelu_tanh"]
# Understanding-image resize (unix.infer.io.fit_image): "letterbox" pads to a white square, then
# resizes (bicubic); "thumbnail" is the authors' evaluation: shrink to fit (LANCZOS, never upscaled),
# centred on a white square.
Resize = Literal["letterbox", "thumbnail"]

# Report length: tokens generated after the start BOS, the stop EOS not counted.
DEFAULT_MAX_NEW_TOKENS = 500  # ours: the paper's "at most 500 steps", all of them new tokens
# The release decodes for max_length=500 steps and counts the start token as one of them, so at
# most 499 new tokens (reference/unix-compat.md 3.3, modeling/unix/unix.py::generate_text).
RELEASE_MAX_NEW_TOKENS = 499


@dataclass(frozen=True)
class InferenceSettings:
    double_bos: bool = False  # feed BOS twice before every text segment (the release's tokenizer adds its own)
    connector_act: ConnectorAct = "gelu"  # activation between the connector's two layers
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # report tokens after the start BOS; EOS stops and is not counted
    resize: Resize = "letterbox"  # how an X-ray becomes the ViT's square input
    sources: dict = field(default_factory=dict, compare=False)  # setting -> where its value came from

    def record(self) -> dict:
        """The values and their sources, for output rows and `unix weights check`."""
        return {**{k: getattr(self, k) for k in SETTINGS}, "sources": dict(self.sources)}


SETTINGS = tuple(f.name for f in fields(InferenceSettings) if f.name != "sources")

# What the authors' runs used (reference/unix-compat.md): the Janus tokenizer's own BOS before the
# segment BOS (3.2), tanh-GELU in the connector (1.6, `connector_act='gelu_pytorch_tanh'`),
# 499 new tokens (3.3), and their evaluation worker's thumbnail-on-white resize (5.4).
RELEASE = {"double_bos": True, "connector_act": "gelu_tanh", "max_new_tokens": RELEASE_MAX_NEW_TOKENS, "resize": "thumbnail"}


def check_value(key: str, value, where: str | None, name: str | None = None):
    """`value` for setting `key`, or a UserError "`where`: `name` = value is not ..." (`name`: the key)."""
    say = f"{where + ': ' if where else ''}{name or key} = {value!r}"
    if key == "double_bos":
        if not isinstance(value, bool):
            raise UserError(f"{say} is not true or false")
    elif key == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{say} is not a whole number of at least 1")
    elif key in ("connector_act", "resize"):
        allowed = get_args(ConnectorAct if key == "connector_act" else Resize)
        if value not in allowed:
            raise UserError(f"{say} is not one of {', '.join(allowed)}")
    else:
        raise UserError(f"{where or 'inference settings'}: unknown key {key!r} (known: {', '.join(SETTINGS)})")
    return value


def read_inference_file(folder: str | Path) -> dict:
    """The folder's inference.json as settings ({} when absent); every key and value checked."""
    path = Path(folder) / INFERENCE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return {key: check_value(key, value, str(path)) for key, value in raw.items()}


def resolve_inference(folder: str | Path, cfg: ModelConfig, released: bool, given: dict | None = None) -> InferenceSettings:
    """The settings that apply to a folder: flags (`given`, None values ignored) > inference.json >
    the release's values (`released`) > the model config > our defaults."""
    settings = replace(InferenceSettings(), connector_act=cfg.vision.connector_act)
    sources = {k: "default" for k in SETTINGS} | {"connector_act": "config.json"}
    layers = [(RELEASE if released else {}, "release"), (read_inference_file(folder), INFERENCE_FILE)]
    flags = {k: v for k, v in (given or {}).items() if v is not None}
    layers.append(({k: check_value(k, v, None, "--" + k.replace("_", "-")) for k, v in flags.items()}, "flag"))
    for values, source in layers:
        settings = replace(settings, **values)
        sources.update(dict.fromkeys(values, source))
    return replace(settings, sources=sources)
