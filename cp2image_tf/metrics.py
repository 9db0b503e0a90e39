"""Metrics of how much biology survives generation: pixels, and CellProfiler features measured again.

Pixel metrics compare generated crops with the real crops of the same cells. Feature metrics
compare features re-measured on generated (or real, or baseline) crops with the input features
the cells were generated from: per-feature correlations across cells, summarised by CellProfiler
module, and treatment profiles (mean standardised features per treatment) compared between
generated and real cells.

NaN rules, shared by every function here: a correlation is NaN when it has fewer than its
minimum number of finite pairs or when either side is constant; a NaN correlation counts as
r = 0 in medians and as a failure in fractions and retrieval. Non-finite feature values (NaN,
+-inf) are missing values.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from tfrecords_tools.features import feature_name

SSIM_BATCH = 256
PSNR_CAP = 100.0  # dB: the PSNR of mse = 1e-10, given to identical images instead of inf
MODULE_ORDER = ("AreaShape", "Zernike", "Intensity", "Texture", "Granularity", "RadialDistribution")


def pixel_metrics(pred, real) -> dict[str, np.ndarray]:
    """Per-cell "mse", "psnr" and "ssim" of images [N, H, W, C] in [0, 1].

    `pred` may be one image [H, W, C], compared with every real image (the mean-image baseline).
    MSE is the float64 mean over pixels and channels; PSNR = 10 log10(1 / mse) (data range 1),
    capped at PSNR_CAP so identical images give 100 dB, not inf. SSIM is the training loop's:
    tf.image.ssim with max_val 1 and filter_size min(11, H, W), averaged over channels.
    """
    import tensorflow as tf

    real = np.asarray(real)
    pred = np.asarray(pred)
    filter_size = min(11, real.shape[1], real.shape[2])
    mse, ssim = [], []
    for start in range(0, len(real), SSIM_BATCH):
        r = real[start:start + SSIM_BATCH]
        p = np.broadcast_to(pred if pred.ndim == 3 else pred[start:start + SSIM_BATCH], r.shape)
        mse.append(np.mean((p.astype(np.float64) - r) ** 2, axis=(1, 2, 3)))
        ssim.append(tf.image.ssim(tf.constant(p, tf.float32), tf.constant(r, tf.float32), 1.0,
                                  filter_size=filter_size).numpy().astype(np.float64))
    mse = np.concatenate(mse) if mse else np.zeros(0)
    ssim = np.concatenate(ssim) if ssim else np.zeros(0)
    psnr = -10.0 * np.log10(np.maximum(mse, 10.0 ** (-PSNR_CAP / 10.0)))
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def summarize(values: np.ndarray) -> dict:
    """{"mean", "median", "n"} over the finite values; n counts them (NaN mean/median when 0).

    pixel_metrics never gives inf (PSNR is capped at PSNR_CAP), so nothing it returns is left out.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "n": int(finite.size)}


def _pearson(x: np.ndarray, y: np.ndarray, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Pearson r of x, y [rows, k] (broadcast) over rows where both are finite, and
    that count; r is NaN when the count is below min_n or either column is constant there."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    both = np.isfinite(x) & np.isfinite(y)
    n = both.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = np.where(both, x - np.where(both, x, 0.0).sum(axis=0) / n, 0.0)
        yc = np.where(both, y - np.where(both, y, 0.0).sum(axis=0) / n, 0.0)
        r = np.clip((xc * yc).sum(axis=0) / np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum(axis=0)),
                    -1.0, 1.0)
    r[(n < min_n) | _constant(x, both) | _constant(y, both)] = np.nan
    return r, n


def _constant(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, a, np.inf).min(axis=0) == np.where(mask, a, -np.inf).max(axis=0)


def feature_correlations(inputs: pd.DataFrame, measured: pd.DataFrame, min_cells: int = 10) -> pd.DataFrame:
    """Per feature (columns in both, in `measured`'s order): Pearson r and Spearman rho across
    cells between input and measured values, and n, the cells where both are finite.

    Rows are matched by index label. r and rho are NaN when n < min_cells or either side is
    constant over those cells. Spearman ranks use average ranks for ties.
    """
    columns = [c for c in measured.columns if c in inputs.columns]
    if not inputs.index.equals(measured.index):
        inputs = inputs.reindex(measured.index)
    x = inputs[columns].to_numpy(dtype=np.float64)
    y = measured[columns].to_numpy(dtype=np.float64)
    pearson, n = _pearson(x, y, min_cells)
    both = np.isfinite(x) & np.isfinite(y)
    ranks = [pd.DataFrame(np.where(both, a, np.nan)).rank().to_numpy() for a in (x, y)]
    spearman, _ = _pearson(*ranks, min_cells)
    return pd.DataFrame({"pearson": pearson, "spearman": spearman, "n": n.astype(np.int64)},
                        index=pd.Index(columns, name="feature"))


def module_of(feature: str) -> str:
    """Module group of `<Object>_<Module>_<rest>`: "Zernike" for AreaShape_Zernike_*, else the module."""
    parsed = feature_name(feature)
    if parsed.module is None:
        return feature
    if parsed.module == "AreaShape" and (parsed.measurement or "").split("_")[0] == "Zernike":
        return "Zernike"
    return parsed.module


def module_summary(correlations: dict[str, pd.DataFrame], threshold: float = 0.7,
                   column: str = "pearson") -> pd.DataFrame:
    """Long table, one row per (module, method): n_features, n_nan, median_r, fraction.

    `correlations` maps a method name to a feature_correlations result. NaN r counts as 0 for
    median_r and as failing for fraction (the share of features with r >= threshold).
    Modules: AreaShape, Zernike, Intensity, Texture, Granularity, RadialDistribution, any others
    alphabetically, then "all"; methods in the dict's order. A module a method has no feature
    in gets n_features 0 and NaN median_r and fraction.
    """
    modules_of = {method: np.array([module_of(f) for f in frame.index], dtype=object)
                  for method, frame in correlations.items()}
    present = {m for mods in modules_of.values() for m in mods}
    modules = [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER)) + ["all"]
    rows = []
    for module in modules:
        for method, frame in correlations.items():
            r = frame[column] if module == "all" else frame[column][modules_of[method] == module]
            rows.append({"module": module, "method": method, "n_features": int(r.size),
                         "n_nan": int(r.isna().sum()),
                         "median_r": float(r.fillna(0.0).median()) if r.size else float("nan"),
                         "fraction": float((r >= threshold).mean()) if r.size else float("nan")})
    return pd.DataFrame(rows, columns=["module", "method", "n_features", "n_nan", "median_r",
                                       "fraction"])


def standardize(frame: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(x - mean) / std per column of `frame`, with the reference's finite values (std: ddof 0).

    Columns the reference has fewer than two distinct finite values in (std 0 or NaN, or the
    column absent) are dropped and listed; non-finite values become NaN.
    """
    ref = reference.reindex(columns=frame.columns).astype(np.float64)
    ref = ref.where(np.isfinite(ref))
    varies = ref.max() > ref.min()
    dropped = list(varies.index[~varies])
    kept = list(varies.index[varies])
    values = frame[kept].astype(np.float64)
    out = (values.where(np.isfinite(values)) - ref[kept].mean()) / ref[kept].std(ddof=0)
    return out, dropped


def treatment_profiles(measured: pd.DataFrame, treatments: Sequence[str]) -> pd.DataFrame:
    """Mean of each feature per treatment over finite values; index = treatments, sorted."""
    values = measured.astype(np.float64)
    values = values.where(np.isfinite(values))
    return values.groupby(pd.Index(np.asarray(treatments), name="treatment")).mean()


def profile_agreement(generated: pd.DataFrame, real: pd.DataFrame) -> dict:
    """How well generated treatment profiles match the real ones (treatment x feature frames).

    per_treatment: Pearson r over features (both finite) between generated[t] and real[t];
    median_r: their median. retrieval_top1: fraction of treatments whose generated profile
    correlates more with its own real profile than with any other (a tie is a failure);
    retrieved: the real treatment each generated profile correlates most with (None if none);
    chance: 1 / T. r is NaN for fewer than 2 shared finite features or a constant profile; NaN
    counts as 0 in median_r and as a failure in retrieval_top1.
    """
    if set(generated.index) != set(real.index) or set(generated.columns) != set(real.columns):
        raise ValueError("generated and real profiles need the same treatments and features")
    if not len(real):
        raise ValueError("no treatments to compare")
    gen = generated.reindex(index=real.index, columns=real.columns).to_numpy(np.float64).T
    ref = real.to_numpy(np.float64).T
    # r[i, j]: generated treatment i against real treatment j.
    r = np.stack([_pearson(gen, ref[:, [j]], 2)[0] for j in range(ref.shape[1])], axis=1)
    own = np.diag(r)
    others = np.where(np.eye(len(own), dtype=bool) | np.isnan(r), -np.inf, r).max(axis=1)
    hits = np.isfinite(own) & (own > others)
    names = list(real.index)
    best = np.where(np.isnan(r), -np.inf, r).argmax(axis=1)
    return {
        "per_treatment": dict(zip(names, own.tolist())),
        "median_r": float(np.median(np.nan_to_num(own, nan=0.0))),
        "retrieval_top1": float(hits.mean()),
        "retrieved": {t: names[b] if np.isfinite(r[i]).any() else None
                      for i, (t, b) in enumerate(zip(names, best))},
        "chance": 1.0 / len(names),
    }


def _two_samples(a, b, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copies of two samples [N, d] with the same d; all values finite, >= min_rows rows."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two 2-D samples with the same number of features, got {a.shape} and {b.shape}")
    if a.shape[1] < 1:
        raise ValueError("need at least one feature")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("samples contain non-finite values; drop those rows first")
    if len(a) < min_rows or len(b) < min_rows:
        raise ValueError(f"need at least {min_rows} rows in each sample, got {len(a)} and {len(b)}")
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two samples of feature vectors (FID's formula).

    a [Na, d], b [Nb, d]: rows are cells, columns features (standardised CellProfiler features, so
    the result is in squared standard-deviation units, summed over features; it grows with d).
    Returns ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) with sample covariances
    (ddof=1), as FID does on Inception features. 0 for identical samples; shifting every feature
    by c adds d * c^2.

    Tr((S_a S_b)^{1/2}) is the sum of the square roots of the eigenvalues of S_a S_b, which are
    those of the symmetric S_b^{1/2} S_a S_b^{1/2}: two symmetric eigendecompositions, where the
    reference FID code's general matrix square root (scipy.linalg.sqrtm) costs ten times more
    and meets singular covariances (fewer cells than features) with complex rounding. Rounding
    below zero is clipped, in the eigenvalues and in the result.

    Requirements: both samples finite (the caller drops rows with any non-finite value; here they
    raise ValueError) and at least 2 rows each (ValueError). With fewer rows than features the
    covariances are singular and the estimate is biased and unreliable; the caller warns about N < d.
    """
    a, b = _two_samples(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False, ddof=1))
    s_b = np.atleast_2d(np.cov(b, rowvar=False, ddof=1))
    values, vectors = np.linalg.eigh(s_b)
    root_b = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root_b @ s_a @ root_b
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_root)
    return max(value, 0.0)


def _cubic_kernel(x: np.ndarray, y: np.ndarray, d: int) -> np.ndarray:
    """(x @ y.T / d + 1)^3, cubed by in-place products (np.power is ~10x slower here)."""
    g = x @ y.T
    g /= d
    g += 1.0
    k = g * g
    k *= g
    return k


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples [m, d] with the cubic polynomial kernel."""
    m, d = x.shape
    k_xx, k_yy, k_xy = _cubic_kernel(x, x, d), _cubic_kernel(y, y, d), _cubic_kernel(x, y, d)
    off = m * (m - 1)
    return float((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off
                 - 2.0 * k_xy.mean())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Kernel (Inception) distance between two samples of feature vectors: (mean, std) over subsets.

    a [Na, d], b [Nb, d]: rows are cells, columns features (no Inception network: the given
    features). KID is the unbiased estimate of the squared maximum mean discrepancy (MMD^2) with
    the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, in squared kernel units (unitless for
    standardised features). For each of `subsets` subsets, m = min(subset_size, Na, Nb) rows are
    drawn without replacement from each sample (np.random.default_rng(seed), so deterministic for a
    seed) and MMD^2 = mean off-diagonal K_aa + mean off-diagonal K_bb - 2 mean K_ab. Being
    unbiased it can be slightly negative; about 0 for two samples of one distribution.
    Returns (mean, std) of the per-subset values; std uses ddof=0 (0 for one subset) and measures
    subset-sampling spread, not a standard error.

    Requirements: both samples finite (ValueError; the caller drops non-finite rows), the same
    number of features, and m >= 2 (ValueError otherwise). Costs `subsets` x 3 matrix products
    of m x d by d x m, but one when m is both samples' size: every subset then holds every row
    of each sample, and MMD^2 does not depend on the rows' order, so the subsets are one value
    (std 0; computed once, it differs from the mean of the reordered copies in rounding alone).
    """
    a, b = _two_samples(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), len(a), len(b))
    if m < 2:
        raise ValueError(f"subset size must be >= 2, got {m}")
    if m == len(a) == len(b):
        return _mmd2_unbiased(a, b), 0.0
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def finite_mean(values) -> float | None:
    """The mean of the finite values; None when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def half_of_each(labels, which, rng) -> np.ndarray:
    """A mask of a random half (rounded down) of the cells of each label in `which`, drawn in
    `which`'s order from `rng`."""
    labels = np.asarray(labels)
    half = np.zeros(len(labels), bool)
    for label in which:
        idx = np.flatnonzero(labels == label)
        half[rng.permutation(idx)[: len(idx) // 2]] = True
    return half
