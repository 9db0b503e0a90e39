"""Comparing each method's re-measured features with the real cells': distances between
feature distributions, treatment mean profiles against split-half ceilings, and the headline
figures per group of test cells. METHODS and THRESHOLD are defined here, once."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.linalg import LinAlgWarning

from cp2image_tf.metrics import (feature_correlations, finite_mean, frechet_distance,
                                 half_of_each, kernel_inception_distance, profile_agreement,
                                 treatment_profiles)

METHODS = ("model", "nearest neighbour", "mean image", "ceiling")
THRESHOLD = 0.7
# Below this share of features at r >= THRESHOLD for the real crops themselves, re-measuring
# does not reproduce CellProfiler's values on this data: no comparison of the model with the
# baselines means anything, and evaluate prints no headline.
MIN_CEILING = 0.5


def _complete_rows(frame: pd.DataFrame) -> np.ndarray:
    values = frame.to_numpy(np.float64)
    return values[np.isfinite(values).all(axis=1)]


def distances(a: pd.DataFrame, b: pd.DataFrame, seed: int) -> dict:
    """Fréchet distance and KID between two sets of standardised feature rows (rows with a
    missing value left out), with the N of each side."""
    x, y = _complete_rows(a), _complete_rows(b)
    out = {"n": [len(x), len(y)], "features": a.shape[1], "frechet": None, "kid": None,
           "kid_std": None, "n_below_features": min(len(x), len(y)) < a.shape[1]}
    if min(len(x), len(y)) >= 2:
        with warnings.catch_warnings():
            # Singular covariances (fewer cells than features, or the mean image's none at all)
            # are expected here; the Fréchet distance stays finite and n_below_features says so.
            warnings.simplefilter("ignore", LinAlgWarning)
            out["frechet"] = frechet_distance(x, y)
        out["kid"], out["kid_std"] = kernel_inception_distance(x, y, seed=seed)
    return out


def distribution_report(standardized: dict, treatments, seed: int) -> dict:
    """Distances of each method's re-measured features from the real cells', pooled and per
    treatment; the ceiling compares two random halves of the real cells."""
    treatments = np.asarray(treatments)
    real = standardized["ceiling"]
    half = np.random.default_rng(seed + 3).permutation(len(real)) % 2 == 0
    report = {}
    for name, frame in standardized.items():
        def pair(mask):
            if name == "ceiling":
                return distances(real[mask & half], real[mask & ~half], seed)
            return distances(frame[mask], real[mask], seed)
        everyone = np.ones(len(real), bool)
        report[name] = {"pooled": pair(everyone),
                        "per_treatment": {t: pair(treatments == t) for t in sorted(set(treatments))}}
    return report


def split_half_profiles(real: pd.DataFrame, treatments, seed: int, splits: int = 20) -> dict:
    """The real-vs-real ceiling of mean-profile agreement: median over random split-halves."""
    treatments = np.asarray(treatments)
    # A treatment with one cell cannot be split in two; sorted: the same halves in every process.
    usable = [t for t in sorted(set(treatments)) if (treatments == t).sum() >= 2]
    if not usable:
        return {"median_r": None, "retrieval_top1": None, "chance": None, "splits": 0}
    keep = np.isin(treatments, usable)
    real, treatments = real[keep].reset_index(drop=True), treatments[keep]
    rng = np.random.default_rng(seed + 4)
    medians, retrievals = [], []
    for _ in range(splits):
        half = half_of_each(treatments, usable, rng)
        a = treatment_profiles(real[half].reset_index(drop=True), treatments[half])
        b = treatment_profiles(real[~half].reset_index(drop=True), treatments[~half])
        agreement = profile_agreement(a, b)
        medians.append(agreement["median_r"])
        retrievals.append(agreement["retrieval_top1"])
    return {"median_r": float(np.median(medians)), "retrieval_top1": float(np.median(retrievals)),
            "chance": 1.0 / len(set(treatments)), "splits": splits}


def group_headline(mask, pixels: dict, inputs: pd.DataFrame, remeasured: dict,
                   standardized: dict, treatments, correct: dict, seed: int,
                   known_distances: dict | None = None) -> dict:
    """The headline figures for the test cells in `mask`, per method (see headline_lines).
    `known_distances`: each method's `distances` for these cells, already computed (the
    pooled ones of distribution_report, for every cell), so not computed again."""
    treatments = np.asarray(treatments)
    idx = np.flatnonzero(mask)
    group = treatments[idx]
    real = standardized["ceiling"].iloc[idx].reset_index(drop=True)
    half = np.random.default_rng(seed + 3).permutation(len(idx)) % 2 == 0
    real_profiles = treatment_profiles(real, group)
    out = {"cells": len(idx), "treatments": sorted(set(group)), "methods": {}}
    for name, frame in standardized.items():
        frame = frame.iloc[idx].reset_index(drop=True)
        r = feature_correlations(inputs.iloc[idx], remeasured[name].iloc[idx])["pearson"]
        row = {"ssim": float(pixels[name]["ssim"][idx].mean()) if name in pixels else 1.0,
               "fraction_r": float((r >= THRESHOLD).mean()),
               "median_r": float(r.fillna(0.0).median())}
        if known_distances is not None:
            pair = known_distances[name]
        elif name == "ceiling":
            pair = distances(real[half], real[~half], seed)
        else:
            pair = distances(frame, real, seed)
        row.update(frechet=pair["frechet"], kid=pair["kid"], n=pair["n"],
                   n_below_features=pair["n_below_features"], features=pair["features"])
        for kind, per_cell in correct.items():
            row[f"{kind}_accuracy"] = finite_mean(per_cell[name][idx])
        row["profile_r"] = (split_half_profiles(real, group, seed)["median_r"]
                            if name == "ceiling" else
                            profile_agreement(treatment_profiles(frame, group),
                                              real_profiles)["median_r"])
        out["methods"][name] = row
    return out
