"""evaluate: how much of a cell's CellProfiler profile survives generation. This module runs the
steps; compare.py, classify.py, neighbours.py, report.py and charts.py hold what each step
computes or writes.

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
   Retrieval (retrieval.py): treatment mAP of every method's pictures with copairs, per
   treatment with p-values, and each picture's rank of its own cell's input profile.
4. Distributions, as generative models of cells are compared: Fréchet distance and KID
   between generated and real re-measured features (standardised with re-measured
   training cells), pooled and per treatment (the ceiling: two halves of the real cells);
   and the accuracy of a logistic regression trained on re-measured training cells in
   telling the treatment (and, with moa_column, the mechanism) of each picture.
5. Unseen treatments (data converted with --split-by on the treatment): every headline
   figure again for the treatments the training split lacks.
6. Controllability (controllability.py): a few test cells moved along features chosen from
   the data, with their correlated features and alone, drawn, re-measured the same way: does
   the picture change as far as asked (gain), in order (Spearman), and leave unrelated
   features be (specificity)? Beside it the lookup (the nearest training cell at each step).

A training split with a single treatment (one control plate) is evaluated without the
treatment classifier, and the report says so.

Outputs in OUT_DIR: report.json (every figure), report.md (the headline table first),
cells.png (real, generated, nearest neighbour and mean image per treatment),
treatments/<treatment>.png (real, generated and nearest-neighbour cells side by side),
modules.png (per-module agreement against the ceiling), scatter.png (input vs
re-measured values of the best-reproduced features), controllability/<feature>.png (one
traversal per feature, with the asked and re-measured values), features.csv (every feature's
correlations) and remeasured.parquet (every re-measured feature of every picture).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd

from cp2image_tf import metrics
from cp2image_tf.evaluation.charts import control_strips, draw_pictures
from cp2image_tf.evaluation.classify import classify
from cp2image_tf.evaluation.controllability import (DEFAULT_CELLS, DEFAULT_FEATURES,
                                                    controllability_section)
from cp2image_tf.evaluation.compare import (MIN_CEILING, THRESHOLD, distribution_report, group_headline,
                                            split_half_profiles)
from cp2image_tf.evaluation.neighbours import nearest_neighbours
from cp2image_tf.evaluation.retrieval import add_to_headline, retrieval_report
from cp2image_tf.evaluation.report import (module_report, pixel_report, report_markdown,
                                           write_json, write_remeasured)
from cp2image_tf.measuring.remeasure import (dataset_segmentation, one_blas_thread,
                                             plan_measurement, remeasure)
from tfrecords_tools.atomic import OutputFolder
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import matching_manifest, measured_names, treatment_cells
from tfrecords_tools.parts import check_options, client_for
from tfrecords_tools.reader import (DEFAULT_NORMALIZATION, DEFAULT_SCALING, sample_cells,
                                    stratified_quota)
from tfrecords_tools.stages import StageTimer


def evaluate(model, data, out_dir, split: str = "test", max_cells: int | None = 1000,
             reference_cells: int = 10000, train_cells: int = 1000, workers: int | None = None,
             seed: int = 0, progress: bool = True, overwrite: bool = False,
             moa_column: str | None = None, classifier: bool = True,
             scheduler: str | None = None, controllability_cells: int = DEFAULT_CELLS,
             controllability_features: int = DEFAULT_FEATURES) -> dict:
    """Evaluate `model` (see serving.local.load_model) on DATA_DIR's `split`; returns the report.

    `moa_column`: a Metadata_* column with one value per treatment (convert keeps those in the
    manifest), e.g. Metadata_MoA: the classifier is also trained and scored on it.
    `classifier=False` leaves out treatment classification; data with a single treatment in
    its training split is evaluated without it (and the report says so). `scheduler`:
    re-measure on Dask, "local" (a LocalCluster of `workers` processes) or a running
    scheduler's address (see tfrecords_tools.parts). `controllability_cells` test cells are
    traversed along up to `controllability_features` features (controllability.py; 0 cells:
    not at all)."""
    watch = Stopwatch()
    if data is None:
        raise UserInputError("DATA_DIR is needed: the dataset the model was trained on.")
    manifest = matching_manifest(data, model.feature_names)
    counts = _split_counts(manifest, data, split)
    moa = _moa_labels(manifest, data, moa_column) if moa_column else None
    left_out = None if classifier else "--no-classifier"
    if classifier:
        left_out = _check_classes(manifest, data, moa, moa_column)
        classifier = left_out is None
    # Measured under the names the features have (rawGFP's features are CorrGreen's).
    plan = plan_measurement(model.feature_names, measured_names(manifest))
    workers = workers or (1 if scheduler not in (None, "local") else min(2, _cpus()))
    folder = OutputFolder(out_dir, overwrite)  # fails early on an occupied OUT_DIR
    with folder:
        if scheduler is not None:  # connect first: a wrong address fails before any work
            check_options(scheduler, workers)
        with client_for(scheduler, workers, quiet=not progress) as client, one_blas_thread():
            with watch.stage("sample"):
                quota, cells, reference = _sample(model, data, manifest, split, counts,
                                                  max_cells, reference_cells, seed)
            _say(progress, f"Evaluating {len(cells['raw'])} {split} cells of {len(quota)} "
                           f"treatment(s) against {len(reference['raw'])} training cells.")
            predictions, neighbour = _predict(model, manifest, cells, reference, watch)
            measured = _remeasure_all(cells, predictions, reference, neighbour, plan, manifest,
                                      train_cells, seed, workers, progress, client,
                                      model.description.get("scaling", DEFAULT_SCALING), watch)
            found = _compare(model, plan, manifest, cells, predictions, measured, seed,
                             moa if classifier else None, classifier, moa_column, watch)
            found["classifier_left_out"] = left_out
            with watch.stage("controllability"):
                found["controllability"], strips = _controllability(
                    model, data, manifest, cells, reference, plan, measured, found,
                    controllability_cells, controllability_features, seed, workers, progress,
                    client)
            report = _report(model, data, split, quota, cells, reference, manifest, plan,
                             measured, found)
            with watch.stage("outputs"):
                _write_outputs(folder.path, report, cells, predictions, neighbour, reference,
                               measured, found, strips)
            report["timing"] = _timing(watch, measured, found, workers, len(cells["raw"]))
            write_json(folder.path / "report.json", report)
            (folder.path / "report.md").write_text(report_markdown(report))
    report["out_dir"] = str(folder.out_dir)
    return report


def _sample(model, data, manifest, split, counts, max_cells, reference_cells, seed):
    """The evaluated cells (an even share per treatment of the split) and the training cells
    the nearest neighbours, the mean image and the classifier come from."""
    scaling = model.description.get("scaling", DEFAULT_SCALING)
    quota = stratified_quota(counts, max_cells)
    cells = sample_cells(data, manifest, split, quota, scaling, seed)
    ref_quota = stratified_quota(treatment_cells(manifest, "train"), reference_cells)
    reference = sample_cells(data, manifest, "train", ref_quota, scaling, seed + 1)
    return quota, cells, reference


def _predict(model, manifest, cells, reference, watch):
    """The model's pictures of the cells' profiles and the two baselines' (the nearest training
    cell by profile, the mean training image); the neighbours' indices."""
    normalization = model.description.get("normalization", DEFAULT_NORMALIZATION)
    with watch.stage("draw"):
        generated = model.images(cells["raw"])
    with watch.stage("lookup"):
        neighbour = nearest_neighbours(cells["raw"], reference["raw"], manifest, normalization)
        mean_image = reference["crops"].astype(np.float64).mean(0).astype(np.float32)
    return ({"model": generated, "nearest neighbour": reference["crops"][neighbour],
             "mean image": mean_image}, neighbour)


def _remeasure_all(cells, predictions, reference, neighbour, plan, manifest, train_cells, seed,
                   workers, progress, client, scaling, watch) -> dict:
    """Every picture segmented and re-measured in one pool: real, generated, the neighbours
    used plus a random sample of training cells (for standardising and the classifier), the
    mean image. Returns each method's features and the training cells', and the segmentation."""
    channels = measured_names(manifest)
    n = len(cells["raw"])
    rng = np.random.default_rng(seed + 2)
    train_pick = rng.choice(len(reference["raw"]), min(train_cells, len(reference["raw"])),
                            replace=False)
    used = np.union1d(neighbour, train_pick)
    stack = np.concatenate([cells["crops"], predictions["model"], reference["crops"][used],
                            predictions["mean image"][None]])
    measure_start = time.perf_counter()
    # One segmentation for every picture, as a pipeline has: CellProfiler's nucleus threshold
    # where Image.csv gave it, else thresholds pooled over real training crops.
    with watch.stage("segmentation"):
        segmentation, origin = dataset_segmentation(manifest, reference["crops"], scaling,
                                                    plan.objects, reference["raw"])
    with watch.stage("remeasure"):
        measured_all = remeasure(stack, plan, channels, workers=workers, progress=progress,
                                 segmentation=segmentation, client=client)
    in_workers = dict(measured_all.attrs.get("seconds", {}))
    measure_seconds = time.perf_counter() - measure_start
    measured_all = measured_all.reset_index(drop=True)
    real_m = measured_all.iloc[:n].reset_index(drop=True)
    gen_m = measured_all.iloc[n:2 * n].reset_index(drop=True)
    used_m = measured_all.iloc[2 * n:2 * n + len(used)].reset_index(drop=True)
    position = {int(u): k for k, u in enumerate(used)}
    nn_m = used_m.iloc[[position[int(j)] for j in neighbour]].reset_index(drop=True)
    mean_m = pd.DataFrame(np.repeat(measured_all.iloc[[-1]].to_numpy(), n, axis=0),
                          columns=measured_all.columns)
    train_m = used_m.iloc[[position[int(j)] for j in train_pick]].reset_index(drop=True)
    return {"methods": {"model": gen_m, "nearest neighbour": nn_m, "mean image": mean_m,
                        "ceiling": real_m},
            "train": train_m, "train_pick": train_pick,
            "train_treatments": [reference["treatments"][j] for j in train_pick],
            "seconds": measure_seconds, "crops": len(stack), "in_workers": in_workers,
            "segmentation": {**{k: v for k, v in vars(segmentation).items()},
                             "from": origin},
            "settings": segmentation}


def _compare(model, plan, manifest, cells, predictions, measured, seed, moa, classifier,
             moa_column, watch) -> dict:
    """Every comparison of the re-measured features with the input and with the real cells'."""
    with watch.stage("compare"):
        return _comparisons(model, plan, manifest, cells, predictions, measured, seed, moa,
                            classifier, moa_column, watch)


def _comparisons(model, plan, manifest, cells, predictions, measured, seed, moa, classifier,
                 moa_column, watch) -> dict:
    remeasured = measured["methods"]
    pixels = {name: metrics.pixel_metrics(pred, cells["crops"])
              for name, pred in predictions.items()}
    inputs = pd.DataFrame(cells["raw"], columns=model.feature_names)[plan.measurable]
    correlations = {name: metrics.feature_correlations(inputs, frame)
                    for name, frame in remeasured.items()}
    # Features standardised with the re-measured real training cells' statistics.
    standardized, dropped = {}, []
    for name, frame in remeasured.items():
        standardized[name], dropped = metrics.standardize(frame, measured["train"])
    profiles = {name: metrics.treatment_profiles(frame, cells["treatments"])
                for name, frame in standardized.items()}
    treatment_level = {name: metrics.profile_agreement(profiles[name], profiles["ceiling"])
                       for name in ("model", "nearest neighbour", "mean image")}
    treatment_level["ceiling"] = split_half_profiles(standardized["ceiling"],
                                                     cells["treatments"], seed)
    with watch.stage("distributions"):
        distributions = distribution_report(standardized, cells["treatments"], seed)
    test_treatments = np.asarray(cells["treatments"])
    with watch.stage("classifier"):
        classification, correct = (_classify_all(measured, standardized, test_treatments, seed,
                                                 moa, moa_column) if classifier else ({}, {}))
    seen = np.isin(test_treatments, list(treatment_cells(manifest, "train")))
    groups = {"all": np.ones(len(test_treatments), bool)}
    if not seen.all():
        groups.update(seen=seen, unseen=~seen)
    pooled = {name: entry["pooled"] for name, entry in distributions.items()}
    headline = {group: group_headline(mask, pixels, inputs, remeasured, standardized,
                                      test_treatments, correct, seed,
                                      known_distances=pooled if group == "all" else None)
                for group, mask in groups.items() if mask.any()}
    with watch.stage("retrieval"):
        retrieval, per_cell = retrieval_report(standardized, inputs, manifest, test_treatments,
                                               seed)
    add_to_headline(headline, groups, per_cell, len(test_treatments))
    return {"pixels": pixels, "inputs": inputs, "correlations": correlations,
            "modules": metrics.module_summary(correlations, THRESHOLD), "dropped": dropped,
            "treatments": treatment_level, "distributions": distributions,
            "classification": classification, "headline": headline,
            "unseen": sorted(set(test_treatments[~seen])), "retrieval": retrieval}


def _classify_all(measured, standardized, test_treatments, seed, moa, moa_column):
    """Treatment (and, with `moa`, mechanism) classification of every method's pictures."""
    train_z, _ = metrics.standardize(measured["train"], measured["train"])
    train_treatments = measured["train_treatments"]
    classification, correct = {}, {}
    classification, correct["treatment"] = classify(
        train_z, train_treatments, standardized, test_treatments, seed, unseen_halves=True)
    if moa is not None:
        classification["moa"], correct["moa"] = classify(
            train_z, [moa[t] for t in train_treatments], standardized,
            np.array([moa[t] for t in test_treatments]), seed)
        classification["moa"]["column"] = moa_column
    return classification, correct


def _report(model, data, split, quota, cells, reference, manifest, plan, measured,
            found) -> dict:
    """report.json's content but its timing (`_timing`): every figure, with what was
    evaluated."""
    n = len(cells["raw"])
    return {
        "model": model.source,
        "data": str(data),
        "split": split,
        "cells": n,
        "cells_per_treatment": {t: int(k) for t, k in quota.items()},
        "reference_cells": len(reference["raw"]),
        "channels": manifest["channels"],
        "scaling": model.description.get("scaling", DEFAULT_SCALING),
        "features": {"input": len(model.feature_names), "remeasured": len(plan.measurable),
                     "not_remeasured": plan.unmeasurable,
                     "not_remeasured_by_reason": dict(pd.Series(
                         list(plan.unmeasurable.values()), dtype=object).value_counts())},
        "ceiling_check": ceiling_check(found["modules"]),
        "measured_as": measured_names(manifest),
        "segmentation": measured["segmentation"],
        "segmentation_failures": {name: int(frame.isna().all(axis=1).sum())
                                  for name, frame in measured["methods"].items()},
        "pixels": pixel_report(found["pixels"], cells["treatments"]),
        "modules": module_report(found["modules"]),
        "treatments": found["treatments"],
        "distributions": found["distributions"],
        "classification": found["classification"],
        "classifier_left_out": found["classifier_left_out"],
        "controllability": found["controllability"],
        "retrieval": found["retrieval"],
        "headline": found["headline"],
        "unseen_treatments": found["unseen"],
        "training_cells_measured": len(measured["train_pick"]),
        "standardization_dropped": found["dropped"],
    }


def _timing(watch, measured, found, workers, n) -> dict:
    """report.json's timing: the wall seconds in all and of each stage (`stages`: their own
    time, a nested stage's taken out of the stage around it, so that they add up to `seconds`
    with `other`), this process's CPU seconds, and the re-measurement's split into segmenting
    and measuring in its workers (CPU seconds summed over them)."""
    elapsed = watch.elapsed()
    stages = dict(watch.seconds)
    stages["other"] = max(0.0, elapsed - sum(stages.values()))
    return {"seconds": elapsed, "stages": stages, "cpu_seconds": watch.cpu(),
            "measure_seconds": measured["seconds"],
            "measured_crops": measured["crops"], "workers": workers,
            "in_workers": measured["in_workers"],
            "controllability_seconds": found["controllability"]["timing"]["seconds"],
            "seconds_per_1000_cells": elapsed / n * 1000}


def _write_outputs(folder, report, cells, predictions, neighbour, reference, measured, found,
                   strips):
    """features.csv, the pictures (controllability/<feature>.png: one strip per traversed
    feature) and remeasured.parquet (report.json and report.md are written after, with the
    time this took)."""
    table = pd.concat({name: c for name, c in found["correlations"].items()}, axis=1)
    table.columns = [f"{method} {stat}" for method, stat in table.columns]
    table.index.name = "feature"
    table.insert(0, "module", [metrics.module_of(f) for f in table.index])
    table.to_csv(folder / "features.csv")
    draw_pictures(folder, cells, predictions, neighbour, reference, found["correlations"],
                  found["inputs"], measured["methods"], report["channels"], report["modules"],
                  set(report["unseen_treatments"]))
    control_strips(folder / "controllability", strips, report["controllability"],
                   report["channels"])
    write_remeasured(folder / "remeasured.parquet", measured["methods"], measured["train"], cells,
                     [reference["cell_ids"][j] for j in measured["train_pick"]],
                     measured["train_treatments"])


def _controllability(model, data, manifest, cells, reference, plan, measured, found, n_cells,
                     n_features, seed, workers, progress, client) -> tuple[dict, dict]:
    """The controllability section (controllability.py) and its strips, on the evaluated
    cells, their re-measured real crops and the segmentation every picture had."""
    if n_cells <= 0:
        return {"cells": 0, "why": "left out (--controllability-cells 0)",
                "timing": {"seconds": 0.0}}, {}
    return controllability_section(
        model, data, manifest, cells, reference, plan, measured["settings"],
        measured["methods"]["ceiling"], found["correlations"]["ceiling"]["pearson"], n_cells,
        n_features, seed=seed, workers=workers, progress=progress, client=client)


def ceiling_check(modules: pd.DataFrame) -> dict:
    """Whether re-measuring reproduces CellProfiler's values on this data well enough for the
    headline to mean anything: the real crops' share of features at r >= THRESHOLD against
    MIN_CEILING."""
    row = modules[(modules["module"] == "all") & (modules["method"] == "ceiling")]
    share = float(row["fraction"].iloc[0]) if len(row) else float("nan")
    passed = bool(share >= MIN_CEILING)
    return {"share": share, "minimum": MIN_CEILING, "passed": passed,
            "why": None if passed else (
                f"re-measuring the real crops reproduces only {share:.0%} of CellProfiler's "
                f"features at r >= {THRESHOLD} (below {MIN_CEILING:.0%}): the measurement does "
                "not reproduce CellProfiler here, so no comparison of the model with the "
                "baselines means anything. Check that the features were measured on the images "
                "cropped (convert --measured-as, --illum) and the segmentation in report.json.")}


class Stopwatch(StageTimer):
    """A StageTimer (each stage's own wall seconds, report.json's timing.stages) that also gives
    the wall and CPU seconds since it was made."""

    def __init__(self):
        super().__init__()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def cpu(self) -> float:
        """CPU seconds of this process (its threads too) since it was made."""
        return time.process_time() - self.cpu_started


def _split_counts(manifest: dict, data, split: str) -> dict:
    splits = manifest["counts"]["splits"]
    if split not in splits:
        raise UserInputError(f"--split {split}: not a split of {data}; it has "
                             f"{', '.join(f'{k} ({v} cells)' for k, v in splits.items())}.")
    if not splits[split]:
        raise UserInputError(f"--split {split}: {data} has no {split} cells; choose one of "
                             f"{', '.join(k for k, v in splits.items() if v)}.")
    return treatment_cells(manifest, split)


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


def _check_classes(manifest: dict, data, moa: dict | None, moa_column: str | None) -> str | None:
    """Why the treatment classifier is left out (a single training treatment: legitimate data,
    e.g. one control plate), or None; a --moa-column with one value is an error."""
    train = list(treatment_cells(manifest, "train"))
    if len(train) < 2:
        return (f"the training split has {len(train)} treatment ({', '.join(train) or 'none'}); "
                "telling treatments apart needs at least 2 (convert with --treatment-column "
                "naming the column that tells them apart, if the data has one)")
    if moa is not None and len({moa[t] for t in train}) < 2:
        raise UserInputError(
            f"--moa-column {moa_column}: the training cells of {data} have one value "
            f"({moa[train[0]]}); classifying by it needs at least 2.")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr)
