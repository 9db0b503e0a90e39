"""Retrieval, as image-based profiling reports it: does a picture's re-measured profile find
its own treatment among the others' (mean average precision, computed by copairs), and does it
find its own cell's input profile among all the evaluated cells' (per-cell self-retrieval)?

Treatment mAP (copairs.map.average_precision, then mean_average_precision): every picture of
a method is a query against the method's other pictures, ranked by cosine similarity of the
re-measured features standardised with the re-measured training cells (missing values at the
training mean, i.e. 0); pictures of the same treatment are the positives, of another treatment
the negatives. Per treatment: mAP with copairs' permutation p-value and its Benjamini-Hochberg
correction; a treatment is retrieved when the corrected p < P_THRESHOLD. Overall: the mean AP of
every picture, and the fraction of treatments retrieved. Pictures with features identical to
another picture's (every mean image; a training cell that is the nearest neighbour of two test
cells; pictures in which nothing was segmented, all missing) tie in every ranking, and copairs
puts a tied positive before a tied negative, which would credit the mean image with a perfect
mAP: such rows get seeded noise of TIE_NOISE SD, so that ties fall at random.

Self-retrieval: for each picture, the cosine similarity of its re-measured features to every
evaluated cell's input CellProfiler profile (on the features both have; inputs standardised
with the manifest's training mean and SD, re-measured values as above); the rank of its own
cell's profile (1 = the most similar; ties count against it; a picture with nothing measured
ranks last). Reported: the share of pictures whose own profile ranks first (chance 1/N), in the
top 10% (chance ceil(N/10)/N), and the median rank. The ceiling re-measures the real crops.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cp2image_tf.evaluation.compare import METHODS

NULL_SIZE = 10000
P_THRESHOLD = 0.05
TIE_NOISE = 0.01
TOP_SHARE = 0.1
# report.md's names of the methods (report.py imports this module: no import back).
NAMES = {m: "real cells (ceiling)" if m == "ceiling" else m for m in METHODS}


def tie_broken(frame: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F] with missing values at 0 and tied rows jittered, which rows were)."""
    values = frame.to_numpy(np.float64)
    nothing = ~np.isfinite(values).any(axis=1)
    values = np.where(np.isfinite(values), values, 0.0)
    _, inverse, counts = np.unique(values, axis=0, return_inverse=True, return_counts=True)
    tied = (counts[np.ravel(inverse)] > 1) | nothing
    rng = np.random.default_rng(seed)
    values[tied] += rng.normal(0.0, TIE_NOISE, (int(tied.sum()), values.shape[1]))
    return values, tied


def treatment_map(features: np.ndarray, treatments, seed: int,
                  null_size: int = NULL_SIZE) -> tuple[np.ndarray, dict]:
    """copairs' average precision of every row (NaN for a row without positives) and the
    summary: mAP, per treatment mAP and p-values, the fraction of treatments retrieved."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.map.normalization import expected_ap

    treatments = np.asarray(treatments).astype(str)
    meta = pd.DataFrame({"treatment": treatments})
    ap = average_precision(meta, features, pos_sameby=["treatment"], pos_diffby=[],
                           neg_sameby=[], neg_diffby=["treatment"], progress_bar=False)
    per_cell = ap["average_precision"].to_numpy(np.float64)
    scored = np.isfinite(per_cell) & (ap["n_pos_pairs"].to_numpy() > 0)
    maps = mean_average_precision(ap, sameby=["treatment"], null_size=null_size,
                                  threshold=P_THRESHOLD, seed=seed, progress_bar=False,
                                  max_workers=1)
    random = [expected_ap(int(m), int(t - m)) for m, t in
              zip(ap["n_pos_pairs"][scored], ap["n_total_pairs"][scored])]
    per_treatment = {
        row.treatment: {"map": float(row.mean_average_precision), "p_value": float(row.p_value),
                        "corrected_p_value": float(row.corrected_p_value),
                        "retrieved": bool(row.corrected_p_value < P_THRESHOLD),
                        "cells": int((treatments == row.treatment).sum())}
        for row in maps.itertuples()}
    summary = {"map": float(per_cell[scored].mean()) if scored.any() else None,
               "random_map": float(np.mean(random)) if random else None,
               "fraction_retrieved": (float(np.mean([t["retrieved"]
                                                     for t in per_treatment.values()]))
                                      if per_treatment else None),
               "cells": int(scored.sum()), "per_treatment": per_treatment}
    return np.where(scored, per_cell, np.nan), summary


def standardized_inputs(inputs: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """Input CellProfiler values in training SDs from the training mean (the manifest's)."""
    stats = manifest["features"]["stats"]
    where = {name: j for j, name in enumerate(manifest["features"]["names"])}
    columns = [where[c] for c in inputs.columns]
    mean = np.asarray(stats["mean"], np.float64)[columns]
    sd = np.asarray(stats["std"], np.float64)[columns]
    values = inputs.to_numpy(np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    return pd.DataFrame((values - mean) / np.where(sd > 0, sd, 1.0), columns=inputs.columns)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] cosine similarities; 0 for a zero row."""
    def unit(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return unit(a) @ unit(b).T


def self_ranks(measured: pd.DataFrame, inputs_z: pd.DataFrame) -> np.ndarray:
    """For picture i, the rank (1 = first) of input profile i among all the input profiles by
    cosine similarity to its re-measured features, on the columns both have. Ties count
    against it, and a picture with no measured value ranks last."""
    have = set(inputs_z.columns)  # once: rebuilt per column, it cost seconds per method
    columns = [c for c in measured.columns if c in have]
    query = measured[columns].to_numpy(np.float64)
    nothing = ~np.isfinite(query).any(axis=1)
    query = np.where(np.isfinite(query), query, 0.0)
    target = inputs_z[columns].to_numpy(np.float64)
    target = np.where(np.isfinite(target), target, 0.0)
    similarity = cosine(query, target)
    own = np.diag(similarity)
    ranks = (similarity >= own[:, None]).sum(axis=1)
    return np.where(nothing, len(target), ranks)


def top_count(n: int) -> int:
    return max(1, math.ceil(TOP_SHARE * n))


def rank_summary(ranks: np.ndarray, n: int) -> dict:
    """Shares of pictures whose own profile ranks first and in the top 10% of n, median rank."""
    ranks = np.asarray(ranks)
    if not len(ranks):
        return {"top1": None, "top10pct": None, "median_rank": None}
    return {"top1": float((ranks == 1).mean()), "top10pct": float((ranks <= top_count(n)).mean()),
            "median_rank": float(np.median(ranks))}


def retrieval_report(standardized: dict, inputs: pd.DataFrame, manifest: dict, treatments,
                     seed: int, null_size: int = NULL_SIZE) -> tuple[dict, dict]:
    """Treatment mAP and self-retrieval of every method's pictures (see the module's notes).
    Returns report.json's "retrieval" and, per method, each picture's AP and self rank."""
    treatments = np.asarray(treatments).astype(str)
    n = len(treatments)
    inputs_z = standardized_inputs(inputs, manifest)
    from copairs.matching import UnpairedException

    per_cell, maps, selfs, tied = {}, {}, {}, {}
    skipped = None
    for name, frame in standardized.items():
        features, ties = tie_broken(frame, seed)
        tied[name] = int(ties.sum())
        ap, maps[name] = np.full(n, np.nan), None
        if skipped is None:
            try:
                ap, maps[name] = treatment_map(features, treatments, seed, null_size)
            except UnpairedException as err:  # one treatment, or one cell of each
                skipped = f"copairs: {err}"
        ranks = self_ranks(frame, inputs_z)
        per_cell[name] = {"ap": ap, "rank": ranks}
        selfs[name] = rank_summary(ranks, n)
        selfs[name]["per_treatment"] = {t: rank_summary(ranks[treatments == t], n)
                                        for t in sorted(set(treatments))}
    have = set(inputs.columns)
    shared = [c for c in next(iter(standardized.values())).columns if c in have]
    report = {
        "map": {"methods": maps, "null_size": null_size, "p_threshold": P_THRESHOLD,
                "distance": "cosine", "features": next(iter(standardized.values())).shape[1],
                "tied_rows_jittered": tied, "tie_noise_sd": TIE_NOISE,
                "skipped": skipped},
        "self": {"methods": selfs, "profiles": n, "features": len(shared),
                 "top_k": top_count(n),
                 "chance": {"top1": 1.0 / n if n else None,
                            "top10pct": top_count(n) / n if n else None,
                            "median_rank": (n + 1) / 2}},
    }
    return report, per_cell


def add_to_headline(headline: dict, groups: dict, per_cell: dict, n: int) -> None:
    """Each headline row gets its group's treatment mAP (the mean AP of its pictures) and
    self-retrieval shares (ranks among all n profiles)."""
    for group, mask in groups.items():
        if group not in headline:
            continue
        for name, row in headline[group]["methods"].items():
            ap = per_cell[name]["ap"][mask]
            ranks = per_cell[name]["rank"][mask]
            row["map"] = float(np.nanmean(ap)) if np.isfinite(ap).any() else None
            summary = rank_summary(ranks, n)
            row["self_top1"], row["self_top10pct"] = summary["top1"], summary["top10pct"]


def fmt(value, digits) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def retrieval_note(retrieval: dict | None) -> list[str]:
    """The lines under the headline table that say what its retrieval columns are."""
    if not retrieval:
        return []
    maps, selfs = retrieval["map"], retrieval["self"]
    model = maps["methods"].get("model")
    chance = selfs["chance"]
    lines = []
    if model:
        lines.append(f"Treatment mAP: copairs' mean average precision of each picture retrieving "
                     f"the same method's pictures of its treatment (a random ranking about "
                     f"{fmt(model['random_map'], 2)}); per treatment, with p-values, under "
                     "Retrieval.")
    lines.append(f"Self-retrieval: the share of pictures whose own cell's input profile is the "
                 f"most similar to its re-measured features among all {selfs['profiles']} "
                 f"evaluated cells' (top-1, chance {fmt(chance['top1'], 3)}), or among the first "
                 f"{selfs['top_k']} (top 10%, chance {fmt(chance['top10pct'], 2)}).")
    return lines


def retrieval_lines(retrieval: dict) -> list[str]:
    """report.md's Retrieval section: mAP per method and treatment, then self-retrieval."""
    maps, selfs = retrieval["map"], retrieval["self"]
    lines = ["## Retrieval", ""]
    if maps["skipped"]:
        lines += [f"Treatment mAP: not computed ({maps['skipped']}).", ""]
    else:
        methods = [m for m in NAMES if maps["methods"].get(m)]
        treatments = sorted(maps["methods"][methods[0]]["per_treatment"])
        lines += [
            f"Treatment mAP (copairs): each picture queries the same method's other pictures by "
            f"cosine similarity of its {maps['features']} standardised re-measured features; "
            "same treatment = positive. Per treatment: mAP and its permutation p-value "
            f"(copairs, {maps['null_size']} permutations, Benjamini-Hochberg corrected); "
            f"* = retrieved (corrected p < {maps['p_threshold']}). A random ranking scores "
            f"about {fmt(maps['methods'][methods[0]]['random_map'], 2)}.", "",
            "| treatment | " + " | ".join(NAMES[m] for m in methods) + " |",
            "|---|" + "---|" * len(methods)]
        for t in treatments:
            cells = []
            for m in methods:
                entry = maps["methods"][m]["per_treatment"].get(t)
                cells.append("n/a" if entry is None else
                             f"{fmt(entry['map'], 2)} (p {fmt(entry['corrected_p_value'], 3)})"
                             + (" *" if entry["retrieved"] else ""))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("| **all** | " + " | ".join(
            f"**{fmt(maps['methods'][m]['map'], 2)}**, {fmt(maps['methods'][m]['fraction_retrieved'], 2)} "
            "retrieved" for m in methods) + " |")
        jittered = {m: k for m, k in maps["tied_rows_jittered"].items() if k}
        if jittered:
            lines += ["", "Tied pictures, ranked at random (noise of "
                      f"{maps['tie_noise_sd']} SD): "
                      + ", ".join(f"{NAMES.get(m, m)} {k}" for m, k in jittered.items()) + "."]
        lines.append("")
    chance = selfs["chance"]
    lines += [f"Self-retrieval: each picture's re-measured features against the input profiles "
              f"of all {selfs['profiles']} evaluated cells ({selfs['features']} features, "
              "cosine similarity in training SDs): how often its own cell's profile ranks first, "
              f"in the top 10% (the first {selfs['top_k']}), and its median rank. Chance: "
              f"{fmt(chance['top1'], 3)}, {fmt(chance['top10pct'], 2)} and "
              f"{fmt(chance['median_rank'], 1)}.", "",
              "| method | top-1 | top 10% | median rank |", "|---|---|---|---|"]
    for m, label in NAMES.items():
        if m in selfs["methods"]:
            s = selfs["methods"][m]
            lines.append(f"| {label} | {fmt(s['top1'], 3)} | {fmt(s['top10pct'], 2)} | "
                         f"{fmt(s['median_rank'], 1)} |")
    return lines


def retrieval_summary(retrieval: dict) -> list[str]:
    """Two lines for evaluate's command-line summary: treatment mAP and self-retrieval."""
    short = {"model": "model", "nearest neighbour": "nearest neighbour", "mean image": "mean image",
             "ceiling": "real"}
    maps, selfs = retrieval["map"]["methods"], retrieval["self"]
    lines = []
    if maps.get("model"):
        lines.append("Treatment mAP: " + ", ".join(
            f"{short[m]} {fmt(maps[m]['map'], 2)}" for m in short if maps.get(m))
            + f" (random {fmt(maps['model']['random_map'], 2)}).")
    lines.append("Self-retrieval, own profile in the top 10%: " + ", ".join(
        f"{short[m]} {fmt(selfs['methods'][m]['top10pct'], 2)}" for m in short
        if m in selfs["methods"]) + f" (chance {fmt(selfs['chance']['top10pct'], 2)}).")
    return lines
