"""Image-generation metrics on feature sets: Frechet distance, KID, precision/recall/density/coverage,
the CheXGenBench 4-shard average, per-finding conditional metrics and finding agreement.

Every metric takes two feature arrays, `real` (N, D) and `fake` (M, D), computed by one extractor
(`unix.eval.features`). The protocol follows CheXGenBench as run by the UniX release
(`reference/unix-compat.md` 6.2): metrics on 4 equal shards of the data, averaged; KID over 100
random subsets of size min(N, M); PRDC with k = 5; conditional metrics unsharded.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Literal

import numpy as np

from unix.eval.chexpert import CHEXPERT_FINDINGS

Metrics = dict[str, float]
MetricFn = Callable[[np.ndarray, np.ndarray], "Metrics | float"]

N_SHARDS = 4  # CheXGenBench: np.array_split of the real and the synthetic list into 4, metrics averaged
KID_SUBSETS = 100  # CheXGenBench: torchmetrics KernelInceptionDistance(subsets=100)
NEAREST_K = 5  # CheXGenBench: prdc.compute_prdc(real, fake, nearest_k=5)
SEED = 42  # CheXGenBench seeds everything with 42


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return x


def _pair(real, fake, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(real, "real"), _features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: real {x.shape[1]}, fake {y.shape[1]}")
    if min(len(x), len(y)) < min_n:
        raise ValueError(f"need at least {min_n} real and fake samples, got {len(x)} and {len(y)}")
    return x, y


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise removed: those below
    n * eps * largest are zero within float64 precision (their square roots would add ~1e-8 each)."""
    return np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0), w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(real, fake) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2), covariances with N-1 like torchmetrics' FID.

    Tr((S_r S_f)^1/2) is the sum of square roots of the eigenvalues of S_r S_f, which are those of the
    symmetric PSD matrix S_r^1/2 S_f S_r^1/2: computed with `eigh` in float64 there are no complex
    parts to discard, and singular covariances (N < D) are fine."""
    x, y = _pair(real, fake, min_n=2)
    diff = x.mean(0) - y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False, ddof=1), np.cov(y, rowvar=False, ddof=1)
    s_x, s_y = np.atleast_2d(s_x), np.atleast_2d(s_y)
    r = _sqrt_psd(s_x)
    m = r @ s_y @ r
    trace_sqrt = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2 * trace_sqrt)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2 with k(a, b) = (a.b / d + 1)^3; within-set sums exclude the diagonal, the cross term is
    divided by m^2 (torchmetrics' `maximum_mean_discrepancy`)."""
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


def kid(real, fake, n_subsets: int = KID_SUBSETS, subset_size: int | None = None, seed: int = SEED) -> tuple[float, float]:
    """Kernel inception distance: mean and std of the unbiased MMD^2 over `n_subsets` random subsets of
    `subset_size` (default min(N, M), as CheXGenBench) drawn without replacement from each set.
    Unbiased, so it can be negative when the two sets come from one distribution."""
    x, y = _pair(real, fake, min_n=2)
    m = min(len(x), len(y)) if subset_size is None else subset_size
    if not 2 <= m <= min(len(x), len(y)):
        raise ValueError(f"subset_size {m} must be in [2, min(N, M) = {min(len(x), len(y))}]")
    rng = np.random.default_rng(seed)
    values = np.array([_mmd2_unbiased(x[rng.permutation(len(x))[:m]], y[rng.permutation(len(y))[:m]]) for _ in range(n_subsets)])
    return float(values.mean()), float(values.std(ddof=1) if n_subsets > 1 else 0.0)


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def _prdc_numpy(x: np.ndarray, y: np.ndarray, k: int) -> Metrics:
    """The definitions of Naeem et al. 2020, written as `prdc.compute_prdc` computes them."""
    radius_x = np.partition(_pairwise_distances(x, x), k, axis=1)[:, k]  # k-th neighbour; column 0 is the point itself
    radius_y = np.partition(_pairwise_distances(y, y), k, axis=1)[:, k]
    d_xy = _pairwise_distances(x, y)  # (N real, M fake)
    inside_real = d_xy < radius_x[:, None]  # fake j inside the ball of real i
    return {
        "precision": float(inside_real.any(0).mean()),
        "recall": float((d_xy < radius_y[None, :]).any(1).mean()),
        "density": float(inside_real.sum(0).mean() / k),
        "coverage": float((d_xy.min(1) < radius_x).mean()),
    }


def prdc(real, fake, nearest_k: int = NEAREST_K) -> Metrics:
    """Precision, recall, density and coverage with k nearest neighbours. Uses the `prdc` package (the
    reference implementation) when it is installed, else the same computation in numpy."""
    x, y = _pair(real, fake, min_n=min_samples(nearest_k))
    try:
        from prdc import compute_prdc
    except ImportError:
        return _prdc_numpy(x, y, nearest_k)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the sample counts
        out = compute_prdc(x.astype(np.float32), y.astype(np.float32), nearest_k)
    return {name: float(out[name]) for name in ("precision", "recall", "density", "coverage")}


def min_samples(nearest_k: int = NEAREST_K) -> int:
    """Fewest real and fake samples `image_metrics` accepts (the `prdc` package needs k + 2)."""
    return nearest_k + 2


def image_metrics(real, fake, kid_subsets: int = KID_SUBSETS, nearest_k: int = NEAREST_K, seed: int = SEED) -> Metrics:
    """Every distribution metric on one pair of feature sets: fd, kid, kid_std, precision, recall,
    density, coverage."""
    kid_mean, kid_std = kid(real, fake, n_subsets=kid_subsets, seed=seed)
    return {"fd": frechet_distance(real, fake), "kid": kid_mean, "kid_std": kid_std, **prdc(real, fake, nearest_k)}


def shard_values(metric_fn: MetricFn, real, fake, n_shards: int = N_SHARDS) -> list:
    """`metric_fn` on each of `n_shards` near-equal consecutive parts (np.array_split, file order) of
    the real and of the fake set: shard i compares real part i with fake part i."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return [metric_fn(r, f) for r, f in zip(np.array_split(np.asarray(real), n_shards), np.array_split(np.asarray(fake), n_shards))]


def average(values: list) -> "Metrics | float":
    """Mean of a list of floats, or key-wise mean of a list of metric dicts."""
    if isinstance(values[0], dict):
        return {key: float(np.mean([v[key] for v in values])) for key in values[0]}
    return float(np.mean(values))


def sharded(metric_fn: MetricFn, real, fake, n_shards: int = N_SHARDS) -> "Metrics | float":
    """The CheXGenBench reference number: the metric of each quarter of the data, averaged (so FD of
    quarter-size sets, not of the full set)."""
    return average(shard_values(metric_fn, real, fake, n_shards))


def positive(labels, uncertain: Literal["negative", "positive"] = "negative") -> np.ndarray:
    """Boolean (N, F) positives of CheXpert-style labels: 1 positive; 0, blank/NaN negative; -1
    uncertain, counted as `uncertain` says."""
    labels = np.asarray(labels, dtype=np.float64)
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    return (labels == 1) | ((labels == -1) if uncertain == "positive" else False)


def conditional_metrics(
    metric_fn: MetricFn,
    real, fake, real_labels, fake_labels,
    findings: tuple[str, ...] = CHEXPERT_FINDINGS,
    min_images: int = 10,
) -> dict[str, dict]:
    """`metric_fn` restricted, per finding, to the real and the fake images labelled positive for it.
    Labels are (N, len(findings)) arrays in `findings` order. A finding with fewer than `min_images`
    on either side is reported with a `skipped` note instead of metrics."""
    real, fake = np.asarray(real), np.asarray(fake)
    pos_real, pos_fake = positive(real_labels), positive(fake_labels)
    if pos_real.shape != (len(real), len(findings)) or pos_fake.shape != (len(fake), len(findings)):
        raise ValueError(f"labels must be (N, {len(findings)}): got {pos_real.shape} for {len(real)} real, {pos_fake.shape} for {len(fake)} fake")
    out = {}
    for j, finding in enumerate(findings):
        n_real, n_fake = int(pos_real[:, j].sum()), int(pos_fake[:, j].sum())
        entry: dict = {"n_real": n_real, "n_fake": n_fake}
        if min(n_real, n_fake) < min_images:
            entry["skipped"] = f"fewer than {min_images} positive images (real {n_real}, fake {n_fake})"
        else:
            entry["metrics"] = metric_fn(real[pos_real[:, j]], fake[pos_fake[:, j]])
        out[finding] = entry
    return out


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return tp / (tp + (fp + fn) / 2) if tp + fp + fn else None


def finding_agreement(
    pred_labels, prompt_labels,
    findings: tuple[str, ...] = CHEXPERT_FINDINGS,
    uncertain: Literal["negative", "positive"] = "negative",
) -> dict:
    """How well findings detected in generated images agree with the findings of their prompts.

    Both are (N, len(findings)) CheXpert-style labels (see `positive`). Per finding: TP/FP/FN on
    positives and F1 = TP / (TP + (FP + FN) / 2); micro F1 pools the counts of all findings, macro
    F1 averages the per-finding F1. A finding positive in neither set has no F1 (None) and is left
    out of the macro average rather than counted as 0 or 1."""
    pred, true = positive(pred_labels, uncertain), positive(prompt_labels, uncertain)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(findings):
        raise ValueError(f"labels must both be (N, {len(findings)}), got {pred.shape} and {true.shape}")
    per_finding = {}
    for j, finding in enumerate(findings):
        tp = int((pred[:, j] & true[:, j]).sum())
        fp = int((pred[:, j] & ~true[:, j]).sum())
        fn = int((~pred[:, j] & true[:, j]).sum())
        per_finding[finding] = {"f1": _f1(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}
    defined = [v["f1"] for v in per_finding.values() if v["f1"] is not None]
    totals = [sum(v[key] for v in per_finding.values()) for key in ("tp", "fp", "fn")]
    return {
        "per_finding": per_finding,
        "micro_f1": _f1(*totals),
        "macro_f1": float(np.mean(defined)) if defined else None,
        "n": len(pred),
    }
