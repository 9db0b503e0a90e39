"""evaluate: how much of a cell's CellProfiler profile survives generation.

For cells of one split (test by default, sampled evenly across treatments):

1. Pixels: MSE, PSNR and SSIM of generated vs real crops, overall and per treatment.
2. Features: every crop (real, generated, and the baselines') is segmented the same
   way and re-measured with cp-measure for the modules the dataset's features come
   from (cp2image_tf.remeasure). Per feature, Pearson and Spearman correlation between
   the input CellProfiler values and the re-measured values of
     - the model's generated cells,
     - the nearest neighbour: the training crop whose normalised features are closest
       (does the model beat looking up a similar real cell?),
     - the mean training image (the same picture for every cell),
     - the real crops themselves: the ceiling, how well this measurement procedure
       reproduces the original CellProfiler values at all.
   Summarised per module: median r and the fraction of features with r >= 0.7.
3. Treatments: correlation between each treatment's mean re-measured profile for
   generated and for real cells, and top-1 retrieval of the own treatment.

Outputs in OUT_DIR: report.json (every figure), report.md (the tables),
cells.png (real, generated, nearest neighbour and mean image per treatment),
modules.png (per-module agreement against the ceiling), scatter.png (input vs
re-measured values of the best-reproduced features) and features.csv (every
feature's correlations).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

METHODS = ("model", "nearest neighbour", "mean image", "ceiling")
THRESHOLD = 0.7


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
             seed: int = 0, progress: bool = True, overwrite: bool = False) -> dict:
    """Evaluate `model` (see generate.load_model) on DATA_DIR's `split`; returns the report."""
    from cp2image_tf import metrics
    from cp2image_tf.generate import OutputFolder, check_data
    from cp2image_tf.remeasure import fit_cell_threshold, plan as plan_measurement, remeasure

    started = time.perf_counter()
    manifest = check_data(data, model)
    if manifest is None:
        raise UserInputError("DATA_DIR is needed: the dataset the model was trained on.")
    counts = _split_counts(manifest, data, split)
    channels = manifest["channels"]
    plan = plan_measurement(model.feature_names, channels)
    workers = workers or min(2, _cpus())
    folder = OutputFolder(out_dir, overwrite)  # fails early on an occupied OUT_DIR
    try:
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
                                 cell_threshold=threshold)
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
        classification = classify(train_z, train_treatments, standardized, cells["treatments"],
                                  seed)

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
                  remeasured, channels, report["modules"])
        path = folder.commit()
    except BaseException:
        folder.abandon()
        raise
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
    rng = np.random.default_rng(seed + 4)
    medians, retrievals = [], []
    for _ in range(splits):
        half = np.zeros(len(real), bool)
        for t in set(treatments):
            idx = np.flatnonzero(treatments == t)
            half[rng.permutation(idx)[: len(idx) // 2]] = True
        a = treatment_profiles(real[half].reset_index(drop=True), treatments[half])
        b = treatment_profiles(real[~half].reset_index(drop=True), treatments[~half])
        agreement = profile_agreement(a, b)
        medians.append(agreement["median_r"])
        retrievals.append(agreement["retrieval_top1"])
    return {"median_r": float(np.median(medians)), "retrieval_top1": float(np.median(retrievals)),
            "chance": 1.0 / len(set(treatments)), "splits": splits}


def classify(train: pd.DataFrame, train_labels, standardized: dict, labels, seed: int) -> dict:
    """A logistic regression trained on re-measured real training cells, scored on the real
    test cells (the ceiling), the generated ones and the baselines."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(train_labels))
    if len(classes) < 2:
        return {"skipped": "fewer than 2 treatments among the training cells"}
    columns = list(train.columns)
    model = LogisticRegression(max_iter=2000, random_state=seed)
    model.fit(np.nan_to_num(train.to_numpy(np.float64)), np.asarray(train_labels))
    labels = np.asarray(labels)
    seen = np.isin(labels, classes)
    accuracy = {}
    for name, frame in standardized.items():
        predicted = model.predict(np.nan_to_num(frame[columns].to_numpy(np.float64)))
        accuracy[name] = float(np.mean(predicted[seen] == labels[seen])) if seen.any() else None
    return {"accuracy": accuracy, "chance": 1.0 / len(classes), "train_cells": len(train),
            "features": len(columns), "classes": classes,
            "unseen_treatments": sorted(set(labels[~seen]))}


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


def headline_lines(report: dict) -> list[str]:
    """One table: each method against the real cells, the ceiling last."""
    dist, cls = report["distributions"], report["classification"]
    names = {"model": "model", "nearest neighbour": "nearest neighbour",
             "mean image": "mean image", "ceiling": "real cells (ceiling)"}
    lines = [f"| | pixel SSIM | features r >= {THRESHOLD} | Fréchet distance | KID | "
             "treatment accuracy | mean-profile r |", "|---|---|---|---|---|---|---|"]
    for method, label in names.items():
        ssim = (_f(report["pixels"][method]["all"]["ssim"]["mean"], 3)
                if method in report["pixels"] else "1 (itself)")
        pooled = dist[method]["pooled"]
        accuracy = cls.get("accuracy", {}).get(method)
        lines.append(f"| {label} | {ssim} | {_f(report['modules']['all'][method]['fraction'], 2)} "
                     f"| {_f(pooled['frechet'], 1)} | {_f(pooled['kid'], 3)} | "
                     f"{_f(accuracy, 2)} | {_f(report['treatments'][method]['median_r'], 2)} |")
    ceiling = dist["ceiling"]["pooled"]
    lines += ["", f"Distances on the {ceiling['features']} re-measured features standardised with "
              f"{report['training_cells_measured']} re-measured training cells; N = "
              f"{dist['model']['pooled']['n'][0]} generated vs {dist['model']['pooled']['n'][1]} "
              f"real cells (the ceiling: two halves of the real cells, N = "
              f"{ceiling['n'][0]} and {ceiling['n'][1]})."
              + (" N is below the number of features: the Fréchet distance is unreliable at "
                 "this size; KID is not." if dist["model"]["pooled"]["n_below_features"] else ""),
              f"Treatment accuracy: logistic regression trained on the re-measured training "
              f"cells; chance {_f(cls.get('chance'), 2)}."
              + (f" Treatments not in training (unseen): {', '.join(cls['unseen_treatments'])}."
                 if cls.get("unseen_treatments") else ""),
              "Mean-profile r: median over treatments of the correlation between generated and "
              "real mean profiles; the ceiling from random split-halves of the real cells.", ""]
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
              remeasured, channels, modules: dict) -> None:
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
    _module_chart(folder / "modules.png", modules)
    _scatter(folder / "scatter.png", correlations, inputs, remeasured)


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
