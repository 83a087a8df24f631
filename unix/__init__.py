"""UniX: a unified chest X-ray model with an understanding (report) and a generation (image) branch.

Subpackages load on first use (`import unix; unix.infer.load_pipeline(...)`), so `import unix`
stays light and the command line starts fast."""

import importlib

__version__ = "0.1.0"

SUBPACKAGES = ("config", "data", "errors", "eval", "flow", "infer", "models", "tokenizer", "train", "weights")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"unix.{name}")  # importing binds it on the package: called once
    raise AttributeError(f"module 'unix' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *SUBPACKAGES])
