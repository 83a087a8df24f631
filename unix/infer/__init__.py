"""Inference API: `load_pipeline(weights)` then `.reports(paths)` / `.images(prompts, seeds)`."""

from unix.infer.images import ImageSettings
from unix.infer.pipeline import Pipeline, load_pipeline
from unix.infer.reports import ReportSettings
from unix.weights.inference import InferenceSettings

__all__ = ["ImageSettings", "InferenceSettings", "Pipeline", "ReportSettings", "load_pipeline"]
