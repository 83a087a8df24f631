"""Image-generation metrics on feature sets: Frechet distance, KID, precision/recall/density/coverage,
the CheXGenBench 4-shard average, per-finding conditional metrics and finding agreement.

Every metric takes two feature arrays, `real` (N, D) and `fake` (M, D), computed by one extractor
(`unix.eval.features`). The protocol follows CheXGenBench as run by the UniX release
(`reference/unix-compat.md` 6.2): metrics on 4 equal shards of the data, averaged; KID over 100
random subsets of size min(N, M); PRDC with k = 5; conditional metrics unsharded. Two protocols
(`PROTOCOLS`): "release" computes each shard's values as the authors' torchmetrics code does and
rounds them as their scripts do; "exact" keeps full float64 precision.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Literal

import numpy as np
import torch

from unix.eval.chexpert import CHEXPERT_FINDINGS

Metrics = dict[str, float]
MetricFn = Callable[[np.ndarray, np.ndarray], "Metrics | float"]
Protocol = Literal["release", "exact"]

N_SHARDS = 4  # CheXGenBench: np.array_split of the real and the synthetic list into 4, metrics averaged
KID_SUBSETS = 100  # CheXGenBench: torchmetrics KernelInceptionDistance(subsets=100)
NEAREST_K = 5  # CheXGenBench: prdc.compute_prdc(real, fake, nearest_k=5)
SEED = 42  # CheXGenBench seeds everything with 42
RELEASE_DECIMALS = 3  # metrics/fid.py rounds each shard's values, tools/combine_shards.py their mean
RELEASE_BATCH = 128  # scripts/image_quality_metrics_memory_saving.sh: torchmetrics sums features per batch of 128

PROTOCOLS: dict[str, str] = {
    "release": (
        "the UniX authors' CheXGenBench scripts (eval/gen_metrics/metrics/fid.py, tools/combine_shards.py): "
        "real rows de-duplicated by prompt (first kept), both lists split into 4 consecutive shards "
        "(np.array_split); per shard FD and KID computed as torchmetrics computes them (FD cast to float32; KID "
        "in float32 over 100 subsets of min(N_real, N_fake)) and PRDC with k = 5, each rounded to 3 decimals; "
        "the reported value is the mean of the 4 rounded shard values, rounded to 3 decimals"
    ),
    "exact": (
        "the same data, shards and metrics at full float64 precision: FD from a symmetric eigen-decomposition, "
        "KID over 100 numpy-seeded subsets, the plain mean of the shard values, nothing rounded"
    ),
}


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
    """Kernel inception distance: mean and (population, as torchmetrics) std of the unbiased MMD^2 over
    `n_subsets` random subsets of `subset_size` (default min(N, M), as CheXGenBench) drawn without
    replacement from each set. Unbiased, so it can be negative when the two sets come from one
    distribution. With N = M = subset_size every subset is the whole set and the value is deterministic."""
    x, y = _pair(real, fake, min_n=2)
    m = _subset_size(len(x), len(y), subset_size)
    rng = np.random.default_rng(seed)
    values = np.array([_mmd2_unbiased(x[rng.permutation(len(x))[:m]], y[rng.permutation(len(y))[:m]]) for _ in range(n_subsets)])
    return float(values.mean()), float(values.std())


def _subset_size(n: int, m: int, subset_size: int | None) -> int:
    size = min(n, m) if subset_size is None else subset_size
    if not 2 <= size <= min(n, m):
        raise ValueError(f"subset_size {size} must be in [2, min(N, M) = {min(n, m)}]")
    return size


# --- the authors' computations, op for op (torchmetrics 1.2 - 1.9, prdc 0.2) ---------------------------


def _torch_pair(real, fake, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as the feature module returned them (float32 for RAD-DINO): the authors' metrics run in
    that dtype, so it is kept rather than upcast."""
    x, y = torch.as_tensor(np.asarray(real)), torch.as_tensor(np.asarray(fake))
    _pair(x.numpy(), y.numpy(), min_n)  # shape, finiteness and size checks
    return x, y


def _torchmetrics_moments(f: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FrechetInceptionDistance.update/compute: float64 sums of x and x x^T per update batch, then mean
    and (sum x x^T - n mu mu^T) / (n - 1)."""
    total, outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
    for chunk in torch.split(f.double(), batch):
        total += chunk.sum(dim=0)
        outer += chunk.t().mm(chunk)
    n = len(f)
    mean = (total / n).unsqueeze(0)
    return mean.squeeze(0), (outer - n * mean.t().mm(mean)) / (n - 1)


def frechet_distance_torchmetrics(real, fake, batch: int = RELEASE_BATCH) -> float:
    """FD as torchmetrics' FrechetInceptionDistance computes it from these features: Tr((S_r S_f)^1/2)
    as the real parts of the complex square roots of the eigenvalues of the non-symmetric S_r S_f, the
    result cast back to the features' dtype. Rounding noise in the zero eigenvalues of a singular S_r S_f
    (N < D) enters this sum; `frechet_distance` removes it."""
    x, y = _torch_pair(real, fake, min_n=2)
    mu1, sigma1 = _torchmetrics_moments(x, batch)
    mu2, sigma2 = _torchmetrics_moments(y, batch)
    a = (mu1 - mu2).square().sum(dim=-1)
    b = sigma1.trace() + sigma2.trace()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum(dim=-1)
    return float((a + b - 2 * c).to(x.dtype))


def _poly_mmd(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """torchmetrics' poly_mmd: kernel (f1 f2^T / d + 1)^3, unbiased MMD^2 (diagonals left out of the
    within-set sums, the cross sum divided by m^2); sums in the order torchmetrics takes them."""
    gamma = 1.0 / f_real.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + 1.0) ** 3 for a, b in ((f_real, f_real), (f_fake, f_fake), (f_real, f_fake)))
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(dim=-1) - torch.diag(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(dim=-1) - torch.diag(k_yy)).sum()
    value = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
    return value - 2 * k_xy.sum(dim=0).sum() / (m**2)


def kid_torchmetrics(real, fake, n_subsets: int = KID_SUBSETS, subset_size: int | None = None, seed: int = SEED) -> tuple[float, float]:
    """KID as torchmetrics' KernelInceptionDistance computes it (in the features' dtype; mean and
    population std over subsets), with each subset's two `torch.randperm` draws taken from a generator
    seeded `seed`. torchmetrics draws from torch's global generator, whose state in the authors' run
    (seeded 42 at start, then consumed by model set-up and data loading) cannot be known; with
    N_real = N_fake = subset size the draws do not matter."""
    x, y = _torch_pair(real, fake, min_n=2)
    m = _subset_size(len(x), len(y), subset_size)
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(n_subsets):
        f_real = x[torch.randperm(len(x), generator=generator)[:m]]
        f_fake = y[torch.randperm(len(y), generator=generator)[:m]]
        scores.append(_poly_mmd(f_real, f_fake))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


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


def image_metrics(
    real, fake, kid_subsets: int = KID_SUBSETS, nearest_k: int = NEAREST_K, seed: int = SEED, protocol: Protocol = "exact",
) -> Metrics:
    """Every distribution metric on one pair of feature sets. "exact": fd, kid, kid_std, precision,
    recall, density, coverage in float64. "release": fd, kid, precision, recall, density, coverage as
    one run of the authors' metrics/fid.py reports them, each rounded to 3 decimals."""
    if protocol == "release":
        kid_mean, _ = kid_torchmetrics(real, fake, n_subsets=kid_subsets, seed=seed)
        values = {"fd": frechet_distance_torchmetrics(real, fake), "kid": kid_mean, **prdc(real, fake, nearest_k)}
        return {name: round(value, RELEASE_DECIMALS) for name, value in values.items()}
    if protocol != "exact":
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    kid_mean, kid_std = kid(real, fake, n_subsets=kid_subsets, seed=seed)
    return {"fd": frechet_distance(real, fake), "kid": kid_mean, "kid_std": kid_std, **prdc(real, fake, nearest_k)}


def combine(shards: list[Metrics], protocol: Protocol = "exact") -> Metrics:
    """The reported values from per-shard metrics: their mean; under "release" as combine_shards.py
    takes it: the rounded shard values as numpy float64 (it reads them back with pandas), summed in
    shard order (theirs: directory-listing order), divided by the count and rounded by numpy, which
    scales, rounds half to even and scales back: 0.8705 gives 0.87 where Python's round gives 0.871."""
    if protocol == "release":
        return {key: float(round(sum(np.float64(s[key]) for s in shards) / len(shards), RELEASE_DECIMALS)) for key in shards[0]}
    return average(shards)


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
