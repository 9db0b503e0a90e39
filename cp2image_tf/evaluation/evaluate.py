"""evaluate: how much of a cell's CellProfiler profile survives generation.

For cells of one split (test by default, sampled evenly across treatments):

1. Pixels: MSE, PSNR and SSIM of generated vs real crops, overall and per treatment.
2. Features: every crop (real, generated, and the baselines') is segmented the same
   way and re-measured with cp-measure for the modules the dataset's features come
   from (cp2image_tf.measuring.remeasure). Per feature, Pearson and Spearman correlation between
   the input CellProfiler values and the re-measured values of
     - the model's generated cells,
     - the nearest neighbour: the training crop whose normalised features are closest
       (does the model beat looking up a similar real cell?),
     - the mean training image (the same picture for every cell),
     - the real crops themselves: the ceiling, how well this measurement procedure
       reproduces the original CellProfiler values at all.
   Summarised per module: median r and the fraction of features with r >= 0.7.
3. Treatments: correlation between each treatment's mean re-measured profile for
   generated and for real cells (the ceiling: random split-halves of the real cells),
   and top-1 retrieval of the own treatment.
4. Distributions, as generative models of cells are compared: Fréchet distance and KID
   between generated and real re-measured features (standardised with re-measured
   training cells), pooled and per treatment (the ceiling: two halves of the real cells);
   and the accuracy of a logistic regression trained on re-measured training cells in
   telling the treatment (and, with moa_column, the mechanism) of each picture.
5. Unseen treatments (data converted with --split-by on the treatment): every headline
   figure again for the treatments the training split lacks.

Outputs in OUT_DIR: report.json (every figure), report.md (the headline table first),
cells.png (real, generated, nearest neighbour and mean image per treatment),
treatments/<treatment>.png (real, generated and nearest-neighbour cells side by side),
modules.png (per-module agreement against the ceiling), scatter.png (input vs
re-measured values of the best-reproduced features), features.csv (every feature's
correlations) and remeasured.parquet (every re-measured feature of every picture).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

METHODS = ("model", "nearest neighbour", "mean image", "ceiling")
THRESHOLD = 0.7
PER_TREATMENT_CELLS = 6


def _split_counts(manifest: dict, data, split: str) -> dict:
    splits = manifest["counts"]["splits"]
    if split not in splits:
        raise UserInputError(f"--split {split}: not a split of {data}; it has "
                             f"{', '.join(f'{k} ({v} cells)' for k, v in splits.items())}.")
    if not splits[split]:
        raise UserInputError(f"--split {split}: {data} has no {split} cells; choose one of "
                             f"{', '.join(k for k, v in splits.items() if v)}.")
    return {t: n for t, n in manifest["counts"]["treatments"][split].items() if n}


def stratified_quota(counts: dict, max_cells: int | None) -> dict:
    """Cells per treatment: an even share of max_cells (unused shares go to the larger ones)."""
    if max_cells is None or max_cells >= sum(counts.values()):
        return dict(counts)
    quota = {t: 0 for t in counts}
    left = max_cells
    open_ = sorted(counts, key=lambda t: counts[t])
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for t in list(open_):
            take = min(share, counts[t] - quota[t], left)
            quota[t] += take
            left -= take
            if quota[t] == counts[t]:
                open_.remove(t)
            if left == 0:
                break
    return quota


def read_cells(data, manifest: dict, split: str, quota: dict, scaling: str, seed: int) -> dict:
    """A seeded random sample of a split's cells, `quota[t]` of treatment t, in stream order:
    raw features, crops scaled as the model was trained, treatments and cell ids."""
    from tfrecords_tools.reader import make_dataset

    rng = np.random.default_rng(seed)
    counts = manifest["counts"]["treatments"][split]
    keep = {t: set(rng.choice(counts[t], size=k, replace=False).tolist())
            for t, k in quota.items() if k}
    seen = {t: 0 for t in counts}
    ds = make_dataset(data, split, 256, shuffle=False, repeat=False, with_metadata=True,
                      scaling=scaling, normalization="none", manifest=manifest)
    raw, crops, treatments, ids = [], [], [], []
    for _, batch_crops, meta in ds:
        batch_treatments = [t.decode() for t in meta["treatment"].numpy()]
        chosen = []
        for i, t in enumerate(batch_treatments):
            if seen[t] in keep.get(t, ()):
                chosen.append(i)
            seen[t] += 1
        if chosen:
            raw.append(meta["raw_features"].numpy()[chosen])
            crops.append(batch_crops.numpy()[chosen])
            treatments += [batch_treatments[i] for i in chosen]
            ids += [meta["cell_id"].numpy()[i].decode() for i in chosen]
    return {"raw": np.concatenate(raw), "crops": np.concatenate(crops),
            "treatments": treatments, "cell_ids": ids}


def nearest_neighbours(query_raw, reference_raw, manifest: dict, normalization: str) -> np.ndarray:
    """Index of the reference cell whose normalised features are nearest each query cell."""
    from sklearn.neighbors import NearestNeighbors

    from tfrecords_tools.reader import feature_normalizer

    median, center, scale = feature_normalizer(manifest, normalization)

    def normalise(raw):
        return (np.where(np.isfinite(raw), raw, median) - center) / scale

    index = NearestNeighbors(n_neighbors=1).fit(normalise(reference_raw))
    return index.kneighbors(normalise(query_raw), return_distance=False)[:, 0]


def evaluate(model, data, out_dir, split: str = "test", max_cells: int | None = 1000,
             reference_cells: int = 10000, train_cells: int = 1000, workers: int | None = None,
             seed: int = 0, progress: bool = True, overwrite: bool = False,
             moa_column: str | None = None, classifier: bool = True,
             scheduler: str | None = None) -> dict:
    """Evaluate `model` (see generate.load_model) on DATA_DIR's `split`; returns the report.

    `moa_column`: a Metadata_* column with one value per treatment (convert keeps those in the
    manifest), e.g. Metadata_MoA: the classifier is also trained and scored on it.
    `classifier=False` leaves out treatment classification (needed for data with a single
    treatment in its training split). `scheduler`: re-measure on Dask, "local" (a LocalCluster
    of `workers` processes) or a running scheduler's address (see tfrecords_tools.parts)."""
    from cp2image_tf import metrics
    from cp2image_tf.drawing.generate import OutputFolder, check_data
    from cp2image_tf.measuring.remeasure import fit_cell_threshold, plan as plan_measurement, remeasure

    started = time.perf_counter()
    manifest = check_data(data, model)
    if manifest is None:
        raise UserInputError("DATA_DIR is needed: the dataset the model was trained on.")
    counts = _split_counts(manifest, data, split)
    moa = _moa_labels(manifest, data, moa_column) if moa_column else None
    if classifier:
        _check_classes(manifest, data, moa, moa_column)
    channels = manifest["channels"]
    plan = plan_measurement(model.feature_names, channels)
    workers = workers or (1 if scheduler not in (None, "local") else min(2, _cpus()))
    folder = OutputFolder(out_dir, overwrite)  # fails early on an occupied OUT_DIR
    resources = contextlib.ExitStack()
    try:
        client = None
        if scheduler is not None:  # connect first: a wrong address fails before any work
            from tfrecords_tools.parts import check_options, dask_client

            check_options(scheduler, workers)
            client = resources.enter_context(dask_client(scheduler, workers, quiet=not progress))
        scaling = model.description.get("scaling", "dataset")
        normalization = model.description.get("normalization", "standard")
        quota = stratified_quota(counts, max_cells)
        cells = read_cells(data, manifest, split, quota, scaling, seed)
        train_counts = manifest["counts"]["treatments"]["train"]
        ref_quota = stratified_quota({t: n for t, n in train_counts.items() if n}, reference_cells)
        reference = read_cells(data, manifest, "train", ref_quota, scaling, seed + 1)
        n = len(cells["raw"])
        _say(progress, f"Evaluating {n} {split} cells of {len(quota)} treatment(s) against "
                       f"{len(reference['raw'])} training cells.")

        generated = model.images(cells["raw"])
        neighbour = nearest_neighbours(cells["raw"], reference["raw"], manifest, normalization)
        mean_image = reference["crops"].astype(np.float64).mean(0).astype(np.float32)
        predictions = {"model": generated, "nearest neighbour": reference["crops"][neighbour],
                       "mean image": mean_image}

        pixels = {name: metrics.pixel_metrics(pred, cells["crops"])
                  for name, pred in predictions.items()}

        # Re-measure everything in one pool: real, generated, the neighbours used plus a random
        # sample of training cells (for standardising and the classifier), the mean image.
        rng = np.random.default_rng(seed + 2)
        train_pick = rng.choice(len(reference["raw"]), min(train_cells, len(reference["raw"])),
                                replace=False)
        used = np.union1d(neighbour, train_pick)
        stack = np.concatenate([cells["crops"], generated, reference["crops"][used],
                                mean_image[None]])
        measure_start = time.perf_counter()
        # One cell threshold for every picture, fitted on the real crops, as a pipeline has.
        threshold = fit_cell_threshold(cells["crops"], channels)
        measured_all = remeasure(stack, plan, channels, workers=workers, progress=progress,
                                 cell_threshold=threshold, client=client)
        measure_seconds = time.perf_counter() - measure_start
        measured_all = measured_all.reset_index(drop=True)
        real_m = measured_all.iloc[:n].reset_index(drop=True)
        gen_m = measured_all.iloc[n:2 * n].reset_index(drop=True)
        used_m = measured_all.iloc[2 * n:2 * n + len(used)].reset_index(drop=True)
        position = {int(u): k for k, u in enumerate(used)}
        nn_m = used_m.iloc[[position[int(j)] for j in neighbour]].reset_index(drop=True)
        mean_m = pd.DataFrame(np.repeat(measured_all.iloc[[-1]].to_numpy(), n, axis=0),
                              columns=measured_all.columns)
        remeasured = {"model": gen_m, "nearest neighbour": nn_m, "mean image": mean_m,
                      "ceiling": real_m}

        inputs = pd.DataFrame(cells["raw"], columns=model.feature_names)[plan.measurable]
        correlations = {name: metrics.feature_correlations(inputs, frame)
                        for name, frame in remeasured.items()}
        modules = metrics.module_summary(correlations, THRESHOLD)

        # Features standardised with the re-measured real training cells' statistics.
        train_m = used_m.iloc[[position[int(j)] for j in train_pick]].reset_index(drop=True)
        train_treatments = [reference["treatments"][j] for j in train_pick]
        standardized = {}
        dropped = []
        for name, frame in remeasured.items():
            standardized[name], dropped = metrics.standardize(frame, train_m)
        train_z, _ = metrics.standardize(train_m, train_m)
        profiles = {name: metrics.treatment_profiles(frame, cells["treatments"])
                    for name, frame in standardized.items()}
        treatment_level = {name: metrics.profile_agreement(profiles[name], profiles["ceiling"])
                           for name in ("model", "nearest neighbour", "mean image")}
        treatment_level["ceiling"] = split_half_profiles(standardized["ceiling"],
                                                         cells["treatments"], seed)
        distributions = distribution_report(standardized, cells["treatments"], seed)
        test_treatments = np.asarray(cells["treatments"])
        classification, correct = {}, {}
        if classifier:
            classification, correct["treatment"] = classify(
                train_z, train_treatments, standardized, test_treatments, seed, unseen_halves=True)
            if moa is not None:
                classification["moa"], correct["moa"] = classify(
                    train_z, [moa[t] for t in train_treatments], standardized,
                    np.array([moa[t] for t in test_treatments]), seed)
                classification["moa"]["column"] = moa_column
        seen = np.isin(test_treatments, [t for t, k in train_counts.items() if k])
        groups = {"all": np.ones(n, bool)}
        if not seen.all():
            groups.update(seen=seen, unseen=~seen)
        pooled = {name: entry["pooled"] for name, entry in distributions.items()}
        headline = {group: group_headline(mask, pixels, inputs, remeasured, standardized,
                                          test_treatments, correct, seed,
                                          known_distances=pooled if group == "all" else None)
                    for group, mask in groups.items() if mask.any()}

        failures = {name: int(frame.isna().all(axis=1).sum()) for name, frame in remeasured.items()}
        elapsed = time.perf_counter() - started
        report = {
            "model": model.source,
            "data": str(data),
            "split": split,
            "cells": n,
            "cells_per_treatment": {t: int(k) for t, k in quota.items()},
            "reference_cells": len(reference["raw"]),
            "channels": channels,
            "scaling": scaling,
            "features": {"input": len(model.feature_names), "remeasured": len(plan.measurable),
                         "not_remeasured": plan.unmeasurable},
            "segmentation_failures": failures,
            "pixels": _pixel_report(pixels, cells["treatments"]),
            "modules": _module_report(modules),
            "treatments": treatment_level,
            "distributions": distributions,
            "classification": classification,
            "headline": headline,
            "unseen_treatments": sorted(set(test_treatments[~seen])),
            "training_cells_measured": len(train_pick),
            "standardization_dropped": dropped,
            "timing": {"seconds": elapsed, "measure_seconds": measure_seconds,
                       "measured_crops": len(stack), "workers": workers,
                       "seconds_per_1000_cells": elapsed / n * 1000},
        }
        table = pd.concat({name: c for name, c in correlations.items()}, axis=1)
        table.columns = [f"{method} {stat}" for method, stat in table.columns]
        table.index.name = "feature"
        table.insert(0, "module", [metrics.module_of(f) for f in table.index])
        table.to_csv(folder.path / "features.csv")
        _write_json(folder.path / "report.json", report)
        (folder.path / "report.md").write_text(report_markdown(report))
        _pictures(folder.path, cells, predictions, neighbour, reference, correlations, inputs,
                  remeasured, channels, report["modules"], set(report["unseen_treatments"]))
        _write_remeasured(folder.path / "remeasured.parquet", remeasured, train_m, cells,
                          [reference["cell_ids"][j] for j in train_pick], train_treatments)
        path = folder.commit()
    except BaseException:
        folder.abandon()
        raise
    finally:
        resources.close()
    report["out_dir"] = str(path)
    return report


def _complete_rows(frame: pd.DataFrame) -> np.ndarray:
    values = frame.to_numpy(np.float64)
    return values[np.isfinite(values).all(axis=1)]


def distances(a: pd.DataFrame, b: pd.DataFrame, seed: int) -> dict:
    """Fréchet distance and KID between two sets of standardised feature rows (rows with a
    missing value left out), with the N of each side."""
    from cp2image_tf.metrics import frechet_distance, kernel_inception_distance

    x, y = _complete_rows(a), _complete_rows(b)
    out = {"n": [len(x), len(y)], "features": a.shape[1], "frechet": None, "kid": None,
           "kid_std": None, "n_below_features": min(len(x), len(y)) < a.shape[1]}
    if min(len(x), len(y)) >= 2:
        import warnings

        from scipy.linalg import LinAlgWarning

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
    from cp2image_tf.metrics import profile_agreement, treatment_profiles

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
        half = np.zeros(len(real), bool)
        for t in usable:
            idx = np.flatnonzero(treatments == t)
            half[rng.permutation(idx)[: len(idx) // 2]] = True
        a = treatment_profiles(real[half].reset_index(drop=True), treatments[half])
        b = treatment_profiles(real[~half].reset_index(drop=True), treatments[~half])
        agreement = profile_agreement(a, b)
        medians.append(agreement["median_r"])
        retrievals.append(agreement["retrieval_top1"])
    return {"median_r": float(np.median(medians)), "retrieval_top1": float(np.median(retrievals)),
            "chance": 1.0 / len(set(treatments)), "splits": splits}


def _fit_classifier(features: pd.DataFrame, labels, seed: int):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000, random_state=seed)
    return model.fit(np.nan_to_num(features.to_numpy(np.float64)), np.asarray(labels))


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def classify(train: pd.DataFrame, train_labels, standardized: dict, labels, seed: int,
             unseen_halves: bool = False) -> tuple[dict, dict]:
    """A logistic regression trained on re-measured real training cells, scored on the real
    test cells (the ceiling), the generated ones and the baselines.

    Test cells whose label the training cells lack are unseen. With `unseen_halves`, a second
    classifier also learns a random half of each unseen label's real test cells and is scored
    on the other half, for every method alike. Returns the summary and, per method, 1/0 per
    test cell for a right/wrong prediction (NaN where not scored)."""
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError("a classifier needs at least 2 classes among the training cells")
    columns = list(train.columns)
    labels = np.asarray(labels)
    seen = np.isin(labels, classes)
    frames = {name: frame[columns] for name, frame in standardized.items()}
    correct = {name: np.full(len(labels), np.nan) for name in frames}
    model = _fit_classifier(train, train_labels, seed)
    for name, frame in frames.items():
        if seen.any():
            correct[name][seen] = model.predict(
                np.nan_to_num(frame[seen].to_numpy(np.float64))) == labels[seen]
    unseen = sorted(set(labels[~seen]))
    summary = {"accuracy": {name: _mean(c[seen]) for name, c in correct.items()},
               "chance": 1.0 / len(classes), "cells": int(seen.sum()), "train_cells": len(train),
               "features": len(columns), "classes": classes, "unseen": unseen}
    if unseen and unseen_halves:
        rng = np.random.default_rng(seed + 5)
        learn = np.zeros(len(labels), bool)
        for label in unseen:
            idx = np.flatnonzero(labels == label)
            learn[rng.permutation(idx)[: len(idx) // 2]] = True
        scored = ~seen & ~learn
        extended = _fit_classifier(pd.concat([train, frames["ceiling"][learn]]),
                                   list(train_labels) + list(labels[learn]), seed)
        for name, frame in frames.items():
            if scored.any():
                correct[name][scored] = extended.predict(
                    np.nan_to_num(frame[scored].to_numpy(np.float64))) == labels[scored]
        summary["unseen_accuracy"] = {name: _mean(c[scored]) for name, c in correct.items()}
        summary["unseen_protocol"] = {
            "learned_cells": int(learn.sum()), "scored_cells": int(scored.sum()),
            "chance": 1.0 / (len(classes) + len(unseen)),
            "how": "a second classifier learns the training cells plus a random half of each "
                   "unseen treatment's real test cells; scored on the other half"}
    return summary, correct


def _moa_labels(manifest: dict, data, column: str) -> dict:
    """{treatment: mechanism} from the manifest's treatment-level metadata."""
    kept = manifest["treatments"].get("metadata", {})
    if column not in kept:
        have = ", ".join(sorted(kept)) or "none"
        raise UserInputError(
            f"--moa-column {column}: {data} has no such column with one value per treatment "
            f"(it has: {have}). convert keeps Metadata_* columns that hold one value per "
            "treatment; a dataset converted before it kept them has none: convert it again.")
    return kept[column]


def _check_classes(manifest: dict, data, moa: dict | None, moa_column: str | None) -> None:
    train = [t for t, k in manifest["counts"]["treatments"]["train"].items() if k]
    if len(train) < 2:
        raise UserInputError(
            f"{data}: its training split has {len(train)} treatment(s) "
            f"({', '.join(train) or 'none'}); the treatment classifier needs at least 2. "
            "Pass --no-classifier to evaluate without it, or convert with --treatment-column "
            "naming the column that tells treatments apart.")
    if moa is not None and len({moa[t] for t in train}) < 2:
        raise UserInputError(
            f"--moa-column {moa_column}: the training cells of {data} have one value "
            f"({moa[train[0]]}); classifying by it needs at least 2.")


def group_headline(mask, pixels: dict, inputs: pd.DataFrame, remeasured: dict,
                   standardized: dict, treatments, correct: dict, seed: int,
                   known_distances: dict | None = None) -> dict:
    """The headline figures for the test cells in `mask`, per method (see headline_lines).
    `known_distances`: each method's `distances` for these cells, already computed (the
    pooled ones of distribution_report, for every cell), so not computed again."""
    from cp2image_tf.metrics import (feature_correlations, profile_agreement,
                                     treatment_profiles)

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
            row[f"{kind}_accuracy"] = _mean(per_cell[name][idx])
        row["profile_r"] = (split_half_profiles(real, group, seed)["median_r"]
                            if name == "ceiling" else
                            profile_agreement(treatment_profiles(frame, group),
                                              real_profiles)["median_r"])
        out["methods"][name] = row
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(text, file=sys.stderr)


def _clean(value):
    """JSON-safe: NaN and inf become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_json(path, data) -> None:
    Path(path).write_text(json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")


def _pixel_report(pixels: dict, treatments) -> dict:
    from cp2image_tf.metrics import summarize

    treatments = np.asarray(treatments)
    out = {}
    for name, values in pixels.items():
        entry = {"all": {k: summarize(v) for k, v in values.items()}}
        for t in sorted(set(treatments)):
            entry[t] = {k: summarize(v[treatments == t]) for k, v in values.items()}
        out[name] = entry
    return out


def _module_report(modules: pd.DataFrame) -> dict:
    """metrics.module_summary's long table as {module: {"n_features": n, method: {...}}}."""
    out = {}
    for module, group in modules.groupby("module", sort=False):
        entry = {"n_features": int(group["n_features"].max())}
        for row in group.itertuples():
            entry[row.method] = {"median_r": row.median_r, "fraction": row.fraction,
                                 "nan_r": int(row.n_nan)}
        out[module] = entry
    return out


def report_markdown(report: dict) -> str:
    """The report's tables, readable."""
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['cells']} {report['split']} cells of {report['data']} "
             f"({', '.join(f'{t} {k}' for t, k in report['cells_per_treatment'].items())}); "
             f"nearest neighbours and the mean image from {report['reference_cells']} training "
             f"cells. {report['features']['remeasured']} of {report['features']['input']} features "
             "re-measured with cp-measure.", ""]
    lines += headline_lines(report)
    lines += ["## Pixels", "", "| method | MSE | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    for name, entry in report["pixels"].items():
        a = entry["all"]
        lines.append(f"| {name} | {_f(a['mse']['mean'], 5)} | {_f(a['psnr']['mean'], 2)} | "
                     f"{_f(a['ssim']['mean'], 3)} |")
    lines += ["", "## Feature preservation per module", "",
              f"Pearson r between input and re-measured features: median, and the share of "
              f"features with r >= {THRESHOLD}. The ceiling re-measures the real crops.", ""]
    lines += _module_lines(report["modules"])
    lines += ["", "## Treatments", "",
              "Correlation of each treatment's mean re-measured profile with the real cells' "
              "(standardised features), and top-1 retrieval of the own treatment.", "",
              "| method | median r | retrieval | chance |", "|---|---|---|---|"]
    for name, entry in report["treatments"].items():
        lines.append(f"| {name} | {_f(entry['median_r'], 3)} | {_f(entry['retrieval_top1'], 2)} | "
                     f"{_f(entry['chance'], 2)} |")
    timing = report["timing"]
    lines += ["", "## Time", "",
              f"{timing['seconds']:.0f} s in all ({timing['measure_seconds']:.0f} s measuring "
              f"{timing['measured_crops']} crops on {timing['workers']} worker(s)): "
              f"{timing['seconds_per_1000_cells'] / 60:.1f} min per 1,000 cells.", ""]
    failures = {k: v for k, v in report["segmentation_failures"].items() if v}
    if failures:
        lines += [f"Segmentation found no object in: "
                  f"{', '.join(f'{k} {v} cells' for k, v in failures.items())}.", ""]
    return "\n".join(lines)


HEADLINE_NAMES = {"model": "model", "nearest neighbour": "nearest neighbour",
                  "mean image": "mean image", "ceiling": "real cells (ceiling)"}


def _headline_table(headline: dict) -> list[str]:
    methods = headline["methods"]
    kinds = [k for k in ("treatment", "moa") if f"{k}_accuracy" in methods["model"]]
    titles = {"treatment": "treatment accuracy", "moa": "MoA accuracy"}
    lines = [f"| | pixel SSIM | features r >= {THRESHOLD} | Fréchet distance | KID | "
             + "".join(f"{titles[k]} | " for k in kinds) + "mean-profile r |",
             "|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for method, label in HEADLINE_NAMES.items():
        row = methods[method]
        ssim = "1 (itself)" if method == "ceiling" else _f(row["ssim"], 3)
        lines.append(f"| {label} | {ssim} | {_f(row['fraction_r'], 2)} | {_f(row['frechet'], 1)} "
                     f"| {_f(row['kid'], 3)} | "
                     + "".join(f"{_f(row[f'{k}_accuracy'], 2)} | " for k in kinds)
                     + f"{_f(row['profile_r'], 2)} |")
    return lines


def headline_lines(report: dict) -> list[str]:
    """One table: each method against the real cells, the ceiling last; then the same for
    seen and unseen treatments when the split holds treatments training never saw."""
    cls = report["classification"]
    head = report["headline"]
    model, ceiling = head["all"]["methods"]["model"], head["all"]["methods"]["ceiling"]
    lines = _headline_table(head["all"])
    lines += ["", f"Distances on the {ceiling['features']} re-measured features standardised with "
              f"{report['training_cells_measured']} re-measured training cells; N = "
              f"{model['n'][0]} generated vs {model['n'][1]} real cells (the ceiling: two halves "
              f"of the real cells, N = {ceiling['n'][0]} and {ceiling['n'][1]})."
              + (" N is below the number of features: the Fréchet distance is unreliable at "
                 "this size; KID is not." if model["n_below_features"] else "")]
    if cls:
        lines.append(f"Treatment accuracy: logistic regression trained on the re-measured "
                     f"training cells ({len(cls['classes'])} treatments, chance "
                     f"{_f(cls['chance'], 2)})"
                     + ("; unseen treatments are scored as described under Unseen treatments."
                        if cls.get("unseen_protocol") else "."))
        if "moa" in cls:
            moa = cls["moa"]
            lines.append(f"MoA accuracy: the same, by {moa['column']} ({len(moa['classes'])} "
                         f"classes, chance {_f(moa['chance'], 2)})"
                         + (f"; {', '.join(moa['unseen'])} not among the training cells, not "
                            "scored." if moa["unseen"] else "."))
    else:
        lines.append("No treatment classifier (--no-classifier).")
    lines += ["Mean-profile r: median over treatments of the correlation between generated and "
              "real mean profiles; the ceiling from random split-halves of the real cells.", ""]
    unseen = report.get("unseen_treatments") or []
    if unseen:
        lines += ["## Unseen treatments", "",
                  f"{', '.join(unseen)}: in the {report['split']} split but not among the "
                  "training cells (data converted with --split-by on the treatment). The model "
                  "draws them from their features alone.", ""]
        if cls.get("unseen_protocol"):
            protocol = cls["unseen_protocol"]
            lines += [f"Treatment accuracy for unseen treatments: a second classifier learns the "
                      f"training cells plus {protocol['learned_cells']} real cells (a random "
                      f"half of each unseen treatment) and is scored on the other "
                      f"{protocol['scored_cells']} (chance {_f(protocol['chance'], 2)}).", ""]
        if "seen" not in head:
            lines += ["Every test treatment is unseen: the headline table above is theirs.", ""]
        for group, title in (("seen", "Seen treatments"), ("unseen", "Unseen treatments")):
            if group in head and "seen" in head:
                lines += [f"### {title}: {', '.join(head[group]['treatments'])} "
                          f"({head[group]['cells']} cells)", ""]
                lines += _headline_table(head[group]) + [""]
    return lines


def _f(value, digits) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def _module_lines(modules: dict) -> list[str]:
    header = "| module | features | " + " | ".join(f"{m} r / >= {THRESHOLD}" for m in METHODS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METHODS))]
    for module, row in modules.items():
        cells = [f"{_f(row[m]['median_r'], 2)} / {_f(row[m]['fraction'], 2)}" for m in METHODS]
        lines.append(f"| {module} | {row['n_features']} | " + " | ".join(cells) + " |")
    return lines


def _pictures(folder: Path, cells, predictions, neighbour, reference, correlations, inputs,
              remeasured, channels, modules: dict, unseen: set) -> None:
    from cp2image_tf.drawing.generate import _safe
    from cp2image_tf.viz import save_grid

    treatments = np.asarray(cells["treatments"])
    picks = [i for t in sorted(set(treatments)) for i in np.flatnonzero(treatments == t)[:2]]
    rows = {"real": cells["crops"][picks], "generated": predictions["model"][picks],
            "nearest neighbour": predictions["nearest neighbour"][picks],
            "mean image": np.broadcast_to(predictions["mean image"],
                                          cells["crops"][picks].shape)}
    labels = [f"{treatments[i]}\n{cells['cell_ids'][i]}\nNN {reference['cell_ids'][neighbour[i]]}"
              for i in picks]
    save_grid(folder / "cells.png", rows, channels, labels,
              title="Real cells, the model's drawing of their profiles, the nearest training "
                    "cell by profile, and the mean training image")
    # One picture per treatment: real, generated and nearest-neighbour cells side by side.
    (folder / "treatments").mkdir()
    for t in sorted(set(treatments)):
        picks = np.flatnonzero(treatments == t)[:PER_TREATMENT_CELLS]
        rows = {"real": cells["crops"][picks], "generated": predictions["model"][picks],
                "nearest neighbour": predictions["nearest neighbour"][picks]}
        labels = [f"{cells['cell_ids'][i]}\nNN {reference['cell_ids'][neighbour[i]]}"
                  f"\n({reference['treatments'][neighbour[i]]})" for i in picks]
        save_grid(folder / "treatments" / f"{_safe(t)}.png", rows, channels, labels,
                  title=f"{t}{' (unseen in training)' if t in unseen else ''}: real cells, the "
                        "model's drawing of their profiles, the nearest training cell")
    _module_chart(folder / "modules.png", modules)
    _scatter(folder / "scatter.png", correlations, inputs, remeasured)


def _write_remeasured(path: Path, remeasured: dict, train: pd.DataFrame, cells, train_ids,
                      train_treatments) -> None:
    """Every re-measured feature behind the report, one row per picture: the real test cells
    (method "ceiling"), their generated and baseline pictures, and the training cells."""
    parts = []
    for name, frame in list(remeasured.items()) + [("training", train)]:
        ids, treatments = ((train_ids, train_treatments) if name == "training"
                           else (cells["cell_ids"], cells["treatments"]))
        part = frame.reset_index(drop=True).astype(np.float64)
        part.insert(0, "treatment", list(treatments))
        part.insert(0, "cell_id", list(ids))
        part.insert(0, "method", name)
        parts.append(part)
    pd.concat(parts, ignore_index=True).to_parquet(path, index=False)


def _module_chart(path, table: dict) -> None:
    """Bars per module and method from the report's module table (`_module_report`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(table)
    colours = {"model": "#d62728", "nearest neighbour": "#1f77b4", "mean image": "#7f7f7f",
               "ceiling": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(modules) + 2), 4.2), dpi=100)
    width = 0.8 / len(METHODS)
    x = np.arange(len(modules))
    for ax, key, label in ((axes[0], "median_r", "median Pearson r"),
                           (axes[1], "fraction", f"share of features with r >= {THRESHOLD}")):
        for k, method in enumerate(METHODS):
            values = np.nan_to_num([table[m][method][key] for m in modules])
            ax.bar(x + (k - (len(METHODS) - 1) / 2) * width, values, width, label=method,
                   color=colours[method])
        ax.set_xticks(x)
        ax.set_xticklabels([f"{m.replace('Distribution', chr(10) + 'Distribution')}\n"
                            f"({table[m]['n_features']})" for m in modules], fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Input CellProfiler features vs the same features re-measured on each picture",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def _scatter(path, correlations, inputs, remeasured, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cp2image_tf.metrics import module_of

    ceiling = correlations["ceiling"]["pearson"].dropna().sort_values(ascending=False)
    chosen, modules = [], set()
    for feature in ceiling.index:  # the best-reproduced feature of each module first
        if module_of(feature) not in modules:
            chosen.append(feature)
            modules.add(module_of(feature))
    chosen += [f for f in ceiling.index if f not in chosen]
    chosen = chosen[:n]
    if not chosen:
        return
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), dpi=100, squeeze=False)
    for ax, feature in zip(axes.ravel(), chosen):
        x = inputs[feature].to_numpy()
        for method, colour in (("ceiling", "#2ca02c"), ("model", "#d62728")):
            y = remeasured[method][feature].to_numpy()
            r = correlations[method].loc[feature, "pearson"]
            ax.scatter(x, y, s=5, alpha=0.5, color=colour,
                       label=f"{'real' if method == 'ceiling' else 'generated'} r={_f(r, 2)}")
        ax.set_title(feature if len(feature) < 36 else "_\n".join(feature.split("_", 2)[:2])
                     + "_" + feature.split("_", 2)[2], fontsize=7)
        ax.set_xlabel("input (CellProfiler)", fontsize=7)
        ax.set_ylabel("re-measured", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)
