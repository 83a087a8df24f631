"""Is an input image like the ones a model was trained on? A warning, never a refusal.

A weights folder may carry `input_stats.json`, measured on (a sample of) its training images as
the project's reader gives them (`unix.infer.io.read_image`): the range of their shorter side,
aspect ratio (width / height), mean and standard deviation of intensity, and the intensity
histograms of up to `MAX_REFERENCES` of them. An input is *far* from them when

- its shorter side is under half the smallest training one (less detail than any training image),
- its aspect ratio is outside the training range widened `ASPECT_SLACK` times either way,
- its mean or standard deviation is outside the training range widened by a quarter of its width
  (at least `MIN_INTENSITY_SLACK`),
- its histogram is further from every reference histogram (total variation distance) than
  `histogram_limit`: 1.25 times the furthest any reference is from its nearest other reference.

`unix report` prints a warning for such an image and lists the reasons in its row
(`out_of_domain`); the report is still written. Larger images are never far: the training shards
hold downsized copies of the originals a user would give.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from unix.errors import UserError

INPUT_STATS_FILE = "input_stats.json"
HISTOGRAM_BINS = 16  # of [0, 1]; enough to tell a phantom's black background from a radiograph's
MAX_REFERENCES = 256  # histograms kept in the file (about 25 KB of JSON)
SIZE_SLACK = 2.0  # far: shorter side under the smallest training one / SIZE_SLACK
ASPECT_SLACK = 1.5  # far: aspect outside [lowest / 1.5, highest * 1.5]
INTENSITY_SLACK = 0.25  # far: mean / std outside the training range widened by 0.25 of its width ...
MIN_INTENSITY_SLACK = 0.05  # ... or by at least this much
HISTOGRAM_MARGIN = 1.25  # limit = 1.25 x the largest nearest-neighbour distance among the references


def summary(image: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """The numbers an input is judged by: a gray (H, W) image in [0, 1] -> shape, intensity, histogram."""
    h, w = image.shape
    hist = np.histogram(image, bins, (0.0, 1.0))[0] / image.size
    return {"short_side": min(h, w), "aspect": w / h, "mean": float(image.mean()), "std": float(image.std()), "histogram": hist}


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total variation distance between histograms (0 = same, 1 = no overlap); broadcasts over rows."""
    return 0.5 * np.abs(a - b).sum(-1)


def compute_input_stats(images: Iterable[np.ndarray], source: str) -> dict:
    """`input_stats.json` contents from training images (gray, [0, 1]); `source` says which images
    (a data set, its seed and split, how they were sampled). References: at most MAX_REFERENCES,
    evenly spaced over the images given."""
    rows = [summary(image) for image in images]
    if len(rows) < 2:
        raise UserError(f"input statistics need at least 2 images, got {len(rows)}")
    keep = np.linspace(0, len(rows) - 1, min(len(rows), MAX_REFERENCES)).round().astype(int)
    refs = np.stack([rows[i]["histogram"] for i in keep])
    nearest = [np.delete(_tv(refs, refs[i]), i).min() for i in range(len(refs))]
    stats = {"source": source, "n_images": len(rows)}
    for key in ("short_side", "aspect", "mean", "std"):
        values = [r[key] for r in rows]
        stats[key] = [round(float(min(values)), 4), round(float(max(values)), 4)]
    stats["histogram_bins"] = HISTOGRAM_BINS
    stats["histogram_limit"] = round(HISTOGRAM_MARGIN * float(max(nearest)), 4)
    stats["histograms"] = [[round(float(v), 5) for v in h] for h in refs]
    return stats


def write_input_stats(folder: str | Path, stats: dict) -> Path:
    from unix.infer.io import atomic_write

    path = Path(folder) / INPUT_STATS_FILE
    atomic_write(path, json.dumps(stats) + "\n")
    return path


def read_input_stats(folder: str | Path) -> dict | None:
    """The folder's `input_stats.json` (None when it has none); a damaged file is a UserError naming it."""
    path = Path(folder) / INPUT_STATS_FILE
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
        for key in ("short_side", "aspect", "mean", "std"):
            if len(stats[key]) != 2 or not np.isfinite(np.asarray(stats[key], dtype=np.float64)).all():
                raise ValueError(f"{key} is not a range of two numbers")
        refs = np.asarray(stats["histograms"], dtype=np.float64)
        if refs.ndim != 2 or refs.shape[1] != int(stats["histogram_bins"]) or not refs.size:
            raise ValueError(f"histograms of shape {refs.shape} for {stats['histogram_bins']} bins")
        stats = {**stats, "histograms": refs, "histogram_limit": float(stats["histogram_limit"])}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not valid input statistics ({e.__class__.__name__}: {e})") from None
    return stats


def far_from_training(image: np.ndarray, stats: dict) -> list[str]:
    """Why a gray (H, W) image in [0, 1] is far from the training images `stats` describe ([] when it is not)."""
    s, reasons = summary(image, stats["histograms"].shape[1]), []
    lo = stats["short_side"][0]
    if s["short_side"] < lo / SIZE_SLACK:
        reasons.append(f"shorter side {s['short_side']} px (training images: at least {lo:g} px)")
    lo, hi = stats["aspect"]
    if not lo / ASPECT_SLACK <= s["aspect"] <= hi * ASPECT_SLACK:
        reasons.append(f"aspect ratio {s['aspect']:.4g} (training images: {lo:.3g} to {hi:.3g})")
    for key, what in (("mean", "mean intensity"), ("std", "intensity spread (std)")):
        lo, hi = stats[key]
        slack = max(INTENSITY_SLACK * (hi - lo), MIN_INTENSITY_SLACK)
        if not lo - slack <= s[key] <= hi + slack:
            reasons.append(f"{what} {s[key]:.3f} (training images: {lo:.3f} to {hi:.3f})")
    distance = float(_tv(stats["histograms"], s["histogram"]).min())
    if distance > stats["histogram_limit"]:
        reasons.append(f"intensity histogram unlike any training image's (distance {distance:.2f}; "
                       f"each training image is within {stats['histogram_limit']:.2f} of another)")
    return reasons
