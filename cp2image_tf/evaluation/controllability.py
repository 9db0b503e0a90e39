"""Controllability: does a drawn cell change as far as it is asked to?

For features chosen from the data (`choose_features`: per object, a size, an elongation and a
form feature of AreaShape; per object and channel, a mean intensity, a texture, a granularity
and a radial feature; each the one the real-crop ceiling re-measures best), test cells are
traversed from -span to +span training SDs, pinned to the cell (the exemplar model edits the
training cell nearest it; other models draw each profile), two ways: "correlated" (the other
features move by their training regression on the asked one, as `traverse --correlated`) and
"alone" (only that feature). "lookup" is the baseline: the nearest training cell to each step's
correlated profile, its real crop. Every picture is segmented and re-measured as evaluate
re-measures, with the fast modules (`fast_plan`).

Per feature and way:
- gain: the slope of the re-measured value on the asked value along the traversals (within
  each cell, pooled over cells), divided by the slope of the re-measured value on
  CellProfiler's value over real test crops: re-measurement's own scale cancels, and 1.0 means
  the picture changes as a real cell with that change re-measures.
- spearman: rank correlation of asked and re-measured values along a traversal, median over
  cells (a response that does not change at all counts 0).
- specificity: how far the features that should not move (|training correlation| with the
  asked feature below UNRELATED) move, in their real-crop SD per training SD asked: the median
  over them of the |within-cell slope|. 0 is perfectly specific.

`controllability(model, data)` scores a model from Python in one call; evaluate calls
`controllability_section` with the cells, segmentation and ceiling it already has.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from cp2image_tf.metrics import module_of
from tfrecords_tools.features import object_and_measurement

# kind -> (measurement category, the measurements it may take in order of preference (None:
# any), measured per channel)
KINDS = {
    "size": ("AreaShape", ("Area", "ConvexArea", "FilledArea", "EquivalentDiameter"), False),
    "elongation": ("AreaShape", ("Eccentricity",), False),
    "form": ("AreaShape", ("FormFactor", "Solidity", "Compactness", "Extent"), False),
    "intensity": ("Intensity", ("MeanIntensity", "MedianIntensity", "IntegratedIntensity"), True),
    "texture": ("Texture", None, True),
    "granularity": ("Granularity", None, True),
    "radial": ("RadialDistribution", ("FracAtD", "MeanFrac", "RadialCV"), True),
}
# evaluate's fast modules (measure.DEFAULT_MODULES without Zernike and Feret): what the chosen
# features need; the features they give are the ones specificity is judged on.
FAST_MODULES = ("sizeshape", "intensity", "texture", "granularity4", "granularity",
                "radial_distribution")
UNRELATED = 0.2  # |training correlation| below which a feature should not move
MIN_CEILING_R = 0.5  # a feature the real crops re-measure worse than this cannot be judged
NEAR_BEST = 0.05  # a preferred measurement within this r of the best candidate is taken
WAYS = ("correlated", "alone", "lookup")
DEFAULT_CELLS = 8
DEFAULT_FEATURES = 16
DEFAULT_SPAN = 1.5
DEFAULT_STEPS = 5


def choose_features(ceiling_r: pd.Series, channels, limit: int | None = None,
                    min_r: float = MIN_CEILING_R) -> tuple[list[dict], dict]:
    """The features to traverse: for each object and KINDS entry (and channel, for the
    per-channel kinds), the candidate whose real-crop ceiling r (`ceiling_r`: feature -> r) is
    highest (the most preferred one within NEAR_BEST of it). Returns (chosen, skipped):
    chosen as dicts (feature, object, kind, channel, ceiling_r), every (object, kind)'s best
    channel before any second channel, cut to `limit`; skipped: "<object> <kind>[ <channel>]"
    -> why not."""
    objects = list(dict.fromkeys(object_and_measurement(f)[0] for f in ceiling_r.index))
    chosen, skipped = [], {}
    for obj in objects:
        for kind, (category, preferred, per_channel) in KINDS.items():
            ranked = []
            for channel in (channels if per_channel else [None]):
                label = " ".join(p for p in (obj, kind, channel) if p)
                pool = _candidates(ceiling_r, obj, category, preferred, channel)
                if pool.empty:
                    continue
                if pool.isna().all():
                    skipped[label] = (f"no ceiling r for {', '.join(pool.index[:3])}: its "
                                      "re-measured real crops did not vary (or too few did)")
                    continue
                pool = pool.dropna()
                best = next(f for f in pool.index if pool[f] >= pool.max() - NEAR_BEST)
                if pool[best] < min_r:
                    skipped[label] = (f"its best candidate {best} re-measures at r "
                                      f"{pool[best]:.2f} on real crops (below {min_r})")
                    continue
                ranked.append({"feature": best, "object": obj, "kind": kind, "channel": channel,
                               "ceiling_r": float(pool[best])})
            ranked.sort(key=lambda entry: -entry["ceiling_r"])
            chosen += [dict(entry, rank=k) for k, entry in enumerate(ranked)]
    kinds = list(KINDS)
    chosen.sort(key=lambda e: (e.pop("rank"), objects.index(e["object"]), kinds.index(e["kind"])))
    if limit is not None:
        skipped.update({" ".join(p for p in (e["object"], e["kind"], e["channel"]) if p):
                        f"beyond the first {limit} features" for e in chosen[limit:]})
        chosen = chosen[:limit]
    return chosen, skipped


def _candidates(ceiling_r: pd.Series, obj: str, category: str, preferred, channel) -> pd.Series:
    """ceiling r of `obj`'s features of `category` (and `channel`): only the `preferred`
    measurements when given, in their order."""
    keep, first = [], []
    for feature in ceiling_r.index:
        found, column = object_and_measurement(feature)
        parts = column.split("_")
        if found != obj or parts[0] != category or module_of(feature) == "Zernike":
            continue
        if channel is not None and f"_{channel}_" not in f"_{column}_":
            continue
        keep.append(feature)
        if preferred and len(parts) > 1 and parts[1] in preferred:
            first.append(feature)
    first.sort(key=lambda f: preferred.index(object_and_measurement(f)[1].split("_")[1]))
    return ceiling_r[first if preferred else keep]


def fast_plan(plan, channels):
    """`plan` cut to the features FAST_MODULES make (a Plan of remeasure)."""
    from cp2image_tf.measuring.remeasure import plan_measurement

    kept = [f for f in plan.measurable
            if set(next(iter(plan_measurement([f], channels).modules.values())))
            & set(FAST_MODULES)]
    return plan_measurement(kept, channels)


def controllability(model, data, cells: int = DEFAULT_CELLS, features: int = DEFAULT_FEATURES,
                    real_cells: int = 200, reference_cells: int = 2000, split: str = "test",
                    span: float = DEFAULT_SPAN, steps: int = DEFAULT_STEPS, seed: int = 0,
                    workers: int = 1, progress: bool = False) -> dict:
    """Score `model` (serving.local.load_model, or anything with its attributes) on DATA_DIR:
    evaluate's controllability section, computed on its own. `real_cells` test cells give the
    ceiling (which features the choice may take, and the real-crop slope a gain is divided by),
    `cells` of them are traversed; `reference_cells` training cells give the segmentation
    settings and the lookup. Returns the section (see `controllability_section`)."""
    from cp2image_tf.measuring.remeasure import dataset_segmentation, plan_measurement, remeasure
    from cp2image_tf.metrics import feature_correlations
    from tfrecords_tools.manifest import matching_manifest, measured_names, treatment_cells
    from tfrecords_tools.reader import DEFAULT_SCALING, sample_cells, stratified_quota

    manifest = matching_manifest(data, model.feature_names)
    scaling = model.description.get("scaling", DEFAULT_SCALING)
    test = sample_cells(data, manifest, split, stratified_quota(
        treatment_cells(manifest, split), real_cells), scaling, seed)
    reference = sample_cells(data, manifest, "train", stratified_quota(
        treatment_cells(manifest, "train"), reference_cells), scaling, seed + 1)
    channels = measured_names(manifest)
    plan = fast_plan(plan_measurement(model.feature_names, channels), channels)
    segmentation, _ = dataset_segmentation(manifest, reference["crops"], scaling, plan.objects,
                                           reference["raw"])
    real = remeasure(test["crops"], plan, channels, workers=workers, progress=progress,
                     segmentation=segmentation)
    inputs = pd.DataFrame(test["raw"], columns=model.feature_names)[plan.measurable]
    ceiling_r = feature_correlations(inputs, real)["pearson"]
    section, _ = controllability_section(model, data, manifest, test, reference, plan,
                                         segmentation, real, ceiling_r, cells, features, span,
                                         steps, seed, workers, progress)
    return section


def controllability_section(model, data, manifest, cells, reference, plan, segmentation,
                            real_measured: pd.DataFrame, ceiling_r: pd.Series,
                            n_cells: int = DEFAULT_CELLS, n_features: int = DEFAULT_FEATURES,
                            span: float = DEFAULT_SPAN, steps: int = DEFAULT_STEPS,
                            seed: int = 0, workers: int = 1, progress: bool = False,
                            client=None) -> tuple[dict, dict]:
    """(report section, strips) for test `cells` (sample_cells' dict, their real crops
    re-measured as `real_measured`, in order) and training `reference` cells. `plan` and
    `segmentation`: how every picture is re-measured (cut to `fast_plan`); `ceiling_r`: each
    feature's real-crop Pearson r. Strips: feature -> the first traversed cell's pictures
    [ways, steps, H, W, C] with the asked and re-measured values [ways, steps]."""
    from cp2image_tf.measuring.remeasure import remeasure
    from tfrecords_tools.manifest import measured_names

    started = time.perf_counter()
    channels = measured_names(manifest)
    quick = fast_plan(plan, channels)
    chosen, skipped = choose_features(ceiling_r.reindex(quick.measurable), channels, n_features)
    picks = pick_cells(len(cells["raw"]), n_cells, seed + 3)
    if not chosen or not len(picks):
        return {"cells": 0, "features": [], "skipped": skipped,
                "why": "no feature of the fast modules re-measures well enough on real crops"
                if not chosen else "no test cells",
                "timing": {"seconds": time.perf_counter() - started}}, {}
    _say(progress, f"Controllability: {len(picks)} cells x {len(chosen)} features x "
                   f"{steps} steps, correlated and alone.")
    columns = [model.feature_names.index(entry["feature"]) for entry in chosen]
    origins = traversal_origins(cells["raw"], picks, model.median)
    asked, correlations = asked_profiles(model, data, manifest, origins, columns,
                                          np.linspace(-span, span, steps))
    drawn, inverse, lookup_index = _draw(model, manifest, asked, origins, reference)
    draw_seconds = time.perf_counter() - started
    unique_lookup, lookup_inverse = np.unique(lookup_index, return_inverse=True)
    stack = np.concatenate([drawn, reference["crops"][unique_lookup]]).astype(np.float32)
    measure_start = time.perf_counter()
    frame = remeasure(stack, quick, channels, workers=workers, progress=progress,
                      segmentation=segmentation, client=client)
    values, in_workers = frame.to_numpy(), dict(frame.attrs.get("seconds", {}))
    measure_seconds = time.perf_counter() - measure_start
    shape = asked.shape[:-1]  # [cells, features, 2 ways, steps]
    measured = np.concatenate([values[:len(drawn)][inverse].reshape(*shape, -1),
                               values[len(drawn):][lookup_inverse].reshape(
                                   *shape[:2], 1, shape[3], -1)], axis=2)
    scores = score_features(chosen, columns, asked, measured, correlations, model.feature_names,
                            quick.measurable, cells["raw"], real_measured, model.sd)
    section = {"cells": len(picks), "cell_ids": [cells["cell_ids"][i] for i in picks],
               "span": span, "steps": steps, "pinned": bool(getattr(model, "can_pin", False)),
               "features": scores, "skipped": skipped, **summarise(scores),
               "timing": {"seconds": time.perf_counter() - started, "draw_seconds": draw_seconds,
                          "measure_seconds": measure_seconds, "measured_crops": len(stack),
                          "workers": workers, "in_workers": in_workers}}
    pictures = drawn[inverse].reshape(*shape, *drawn.shape[1:])[0]  # the first cell's
    lookups = reference["crops"][lookup_index.reshape(*shape[:2], shape[3])[0]]
    strips = {entry["feature"]: {
        "images": np.concatenate([pictures[k], lookups[k][None]]),
        "asked": [entry[way]["asked"][0] for way in WAYS],
        "measured": [entry[way]["measured"][0] for way in WAYS]}
        for k, entry in enumerate(scores)}
    return section, strips


def score_features(chosen, columns, asked, measured, correlations, feature_names, measurable,
                   real_raw, real_measured: pd.DataFrame, sd) -> list[dict]:
    """Each chosen feature's gain, Spearman and specificity per way (see the module doc).

    `asked` [cells, features, 2, steps, F] (correlated, alone), `measured` [cells, features,
    3, steps, K] (correlated, alone, lookup; K: `measurable`), `correlations` [features, F];
    `real_raw` [N, F] and `real_measured` (its re-measured real crops) give each feature's
    real-crop slope and SD; `sd`: the training SDs the traversals step in."""
    real = real_measured[measurable].to_numpy(np.float64)
    real_sd = np.nanstd(real, axis=0, ddof=1) if len(real) > 1 else np.full(len(measurable), np.nan)
    in_model = [feature_names.index(f) for f in measurable]
    scores = []
    for k, (entry, j) in enumerate(zip(chosen, columns)):
        kj = measurable.index(entry["feature"])
        unrelated = ((np.abs(correlations[k][in_model]) < UNRELATED) & (real_sd > 0)
                     & (np.arange(len(measurable)) != kj))
        real_slope = regression_slope(real_raw[:, j], real[:, kj])
        row = dict(entry, module=module_of(entry["feature"]), real_slope=real_slope,
                   unrelated_features=int(unrelated.sum()))
        for w, way in enumerate(WAYS):
            x = asked[:, k, 1 if way == "alone" else 0, :, j]  # the lookup's: correlated
            y = measured[:, k, w, :, kj]
            slope = float(within_cell_slope(x[:, :, None], y[:, :, None])[0])
            others = measured[:, k, w][:, :, unrelated] / real_sd[unrelated]
            row[way] = {"gain": slope / real_slope if real_slope else float("nan"),
                        "spearman": median_spearman(x, y),
                        "specificity": specificity(x / sd[j], others),
                        "slope": slope, "asked": x.tolist(), "measured": y.tolist()}
        scores.append(row)
    return scores


def within_cell_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slope of y on x within each cell, pooled over cells: x, y [cells, steps, K] -> [K].
    Each cell's values are centred on its own means (steps where x or y is missing left out;
    a cell with fewer than 2 steps left out); NaN where x does not vary."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    ok = np.isfinite(x) & np.isfinite(y)
    ok &= (ok.sum(axis=1) >= 2)[:, None]
    n = np.maximum(ok.sum(axis=1, keepdims=True), 1)
    xc = np.where(ok, x - np.where(ok, x, 0).sum(axis=1, keepdims=True) / n, 0.0)
    yc = np.where(ok, y - np.where(ok, y, 0).sum(axis=1, keepdims=True) / n, 0.0)
    num, den = (xc * yc).sum(axis=(0, 1)), (xc ** 2).sum(axis=(0, 1))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def regression_slope(x, y) -> float:
    """Least-squares slope of y on x over the pairs where both are finite (NaN below 3)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        return float("nan")
    xc = x[ok] - x[ok].mean()
    return float((xc * (y[ok] - y[ok].mean())).sum() / (xc ** 2).sum())


def median_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Median over cells (rows) of the Spearman correlation of x and y along the steps; a
    response that does not change counts 0, a cell with fewer than 3 measured steps nothing."""
    from scipy.stats import spearmanr

    values = []
    for a, b in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3 or np.ptp(a[ok]) == 0:
            continue
        values.append(0.0 if np.ptp(b[ok]) == 0 else float(spearmanr(a[ok], b[ok])[0]))
    return float(np.median(values)) if values else float("nan")


def specificity(z: np.ndarray, others: np.ndarray) -> float:
    """Median over the features that should not move of |their within-cell slope| on the
    asked SDs: z [cells, steps] in SDs asked, `others` [cells, steps, K] in their SDs."""
    if others.shape[-1] == 0:
        return float("nan")
    slopes = np.abs(within_cell_slope(np.asarray(z)[:, :, None], others))
    return float(np.median(slopes[np.isfinite(slopes)])) if np.isfinite(slopes).any() \
        else float("nan")


def summarise(scores: list[dict]) -> dict:
    """{"modules": per module, "summary": over every feature}: per way the median gain,
    Spearman and specificity (and, overall, the lowest module's median gain)."""
    def medians(rows, way):
        out = {}
        for key in ("gain", "spearman", "specificity"):
            values = np.array([row[way][key] for row in rows], np.float64)
            values = values[np.isfinite(values)]
            out[key] = float(np.median(values)) if len(values) else None
        return out

    modules = {}
    for module in dict.fromkeys(row["module"] for row in scores):
        rows = [row for row in scores if row["module"] == module]
        modules[module] = {"features": len(rows), **{way: medians(rows, way) for way in WAYS}}
    summary = {}
    for way in WAYS:
        summary[way] = medians(scores, way)
        gains = [m[way]["gain"] for m in modules.values() if m[way]["gain"] is not None]
        summary[way]["lowest_module_gain"] = min(gains) if gains else None
    return {"modules": modules, "summary": summary}


def pick_cells(n: int, k: int, seed: int) -> np.ndarray:
    """k of n cells, at random (np.random.default_rng(seed)), in order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(k, n), replace=False)) if k > 0 else np.zeros(0, int)


def traversal_origins(raw: np.ndarray, picks: np.ndarray, median) -> np.ndarray:
    """[cells, F] float64: the picked cells' profiles, where traversals start (a missing value
    at the training median)."""
    origins = raw[picks].astype(np.float64)
    return np.where(np.isfinite(origins), origins, median)


def asked_profiles(model, data, manifest, origins, columns, zs) -> tuple[np.ndarray, np.ndarray]:
    """(profiles [cells, features, 2, steps, F], training correlations [features, F]): each
    chosen feature moved zs training SDs from each cell's profile, with its correlated features
    (way 0) and alone (way 1), within the training range as traverse keeps them."""
    from cp2image_tf.drawing.traverse import (feature_correlations_with, training_range,
                                              traversal_profiles, within_range)

    correlations = feature_correlations_with(data, model, columns)
    bounds = training_range(getattr(model, "manifest", None), manifest)
    sd = np.asarray(model.sd, np.float64)
    out = np.empty((len(origins), len(columns), 2, len(zs), origins.shape[1]))
    for i, origin in enumerate(origins):
        for k, j in enumerate(columns):
            alone = np.zeros(len(origin))
            alone[j] = 1.0
            for w, move in enumerate((correlations[k], alone)):
                profiles = traversal_profiles(origin, j, move, sd, zs)
                if bounds is not None:
                    profiles = within_range(profiles, bounds, origin)[0]
                out[i, k, w] = profiles
    return out, correlations


def _draw(model, manifest, asked, origins, reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique pictures, each asked profile's index among them, each correlated step's
    nearest training cell). The exemplar model draws each traversal as edits of the training
    cell nearest its cell's profile (`origins`: pinned); a profile asked twice (every way's
    step 0 SD) is drawn once."""
    from cp2image_tf.evaluation.neighbours import nearest_neighbours
    from tfrecords_tools.reader import DEFAULT_NORMALIZATION

    n_features = asked.shape[-1]
    flat = asked.reshape(-1, n_features)
    like = np.broadcast_to(origins[:, None, None, None], asked.shape).reshape(-1, n_features)
    _, first, inverse = np.unique(np.concatenate([flat, like], axis=1), axis=0,
                                     return_index=True, return_inverse=True)
    if getattr(model, "can_pin", False):
        drawn = model.edits(flat[first].astype(np.float32), like[first].astype(np.float32))
    else:
        drawn = model.images(flat[first].astype(np.float32))
    normalization = model.description.get("normalization", DEFAULT_NORMALIZATION)
    lookup = nearest_neighbours(asked[:, :, 0].reshape(-1, n_features), reference["raw"],
                                manifest, normalization)
    return np.asarray(drawn), np.asarray(inverse).ravel(), lookup


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr)
