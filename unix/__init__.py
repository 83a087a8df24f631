"""UniX: a unified chest X-ray model with an understanding (report) and a generation (image) branch."""

__version__ = "0.1.0"
