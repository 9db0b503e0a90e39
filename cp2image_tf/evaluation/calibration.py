"""The exemplar model's edit strength, calibrated on re-measured traversals after `fit`
(`cp2image-tf fit` calls `calibrate_after_fit`; from Python, call `calibrate(run_dir, data_dir)`
after `fit`).

The editor's response to an asked change is close to linear in the change but smaller than
asked, by a factor that depends on the data and the run (docs/design/exemplar.md). After the
steps, `calibrate` measures it as evaluate's controllability section does, on validation cells:
features chosen from the data (`choose_features`), each moved with its correlated features
-SPAN..+SPAN training SDs from each cell, pinned, every picture re-measured with cp-measure, and
the gain (the within-cell slope of the re-measured value on the asked one, over the slope of the
re-measured value on CellProfiler's over real crops) taken per feature. Each feature group
(`feature_group`: object, kind and channel) with a chosen feature the edits move gets the
strength that undoes its gain, corrected once from a second measurement at those strengths
(`group_strengths`); every other feature takes 1 / the geometric mean gain of the features the
edits move (`strength_of`); all within STRENGTH_RANGE. calibration.json in the run folder keeps
the per-feature strengths with the checkpoint they were measured on. `load_run` (export, and every
command that draws from a run folder) passes them to the served `edit` signature, which takes the
asked change from the pinned profile that many times, feature by feature: traverse, explore and
evaluate's controllability draw through it. Drawing a profile on its own (generate,
reconstruction) is not changed.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from cp2image_tf.serving.export import CALIBRATION
from tfrecords_tools.atomic import write_json
from tfrecords_tools.features import object_and_measurement

STRENGTH_RANGE = (0.5, 2.0)
# AreaShape measurements that grow with an object's size (its "size" group; the rest "shape").
SIZES = frozenset({"Area", "ConvexArea", "FilledArea", "BoundingBoxArea", "Perimeter",
                   "MajorAxisLength", "MinorAxisLength", "MaxFeretDiameter", "MinFeretDiameter",
                   "EquivalentDiameter", "MaximumRadius", "MeanRadius", "MedianRadius"})
MOVED = 0.25  # a feature whose gain is below this does not move with its ask: not calibrated on
SPAN = 1.5
STEPS = 5
CELLS = 16
FEATURES = 16
REAL_CELLS = 200


def calibrate(run_dir, data_dir, checkpoint: str = "best", cells: int = CELLS,
              features: int = FEATURES, seed: int = 0) -> dict:
    """Measure the run's gains (module doc) at `checkpoint`, write calibration.json and return
    it: the per-feature strength vector ("strength"), the strength of each feature group
    measured ("groups"; the rest take "default"), and the gains before ("gains") and after the
    first correction ("gains_corrected")."""
    from cp2image_tf.serving.local import load_model

    started = time.perf_counter()
    model = load_model(run_dir, checkpoint, calibrated=False)
    probe = Probe(model, data_dir, cells, features, seed)
    names = model.feature_names
    ones = np.ones(len(names))
    gains = probe.gains(ones)
    default, gain, moved = strength_of(gains)
    groups = group_strengths(gains, probe.channels)
    vector = strength_vector(names, probe.channels, groups, default)
    corrected = probe.gains(vector) if groups else {}
    groups = group_strengths(corrected, probe.channels, groups) if groups else groups
    vector = strength_vector(names, probe.channels, groups, default)
    found = {"strength": [round(float(v), 4) for v in vector],
             "step": int(model.description["source"]["step"]),
             "checkpoint": checkpoint, "default": default, "groups": groups,
             "gain": _finite(gain), "moved_features": moved,
             "features": int(sum(np.isfinite(g) for g in gains.values())),
             "gains": {name: _finite(g) for name, g in gains.items()},
             "gains_corrected": {name: _finite(g) for name, g in corrected.items()},
             "cells": cells, "span": SPAN, "steps": STEPS,
             "seconds": round(time.perf_counter() - started, 1)}
    write_json(Path(run_dir) / CALIBRATION, found)
    return found


def strength_of(gains: dict) -> tuple[float, float, int]:
    """(strength, gain, n) of feature -> gain: the gain is the geometric mean over the n
    features the edits move (gain >= MOVED; a scale cannot move the others, and counting them
    would overshoot the rest), the strength 1 / that gain within STRENGTH_RANGE; 1 when no
    feature moves."""
    moved = np.array([g for g in gains.values() if np.isfinite(g) and g >= MOVED])
    if not len(moved):
        return 1.0, float("nan"), 0
    gain = float(np.exp(np.mean(np.log(moved))))
    return float(np.clip(1.0 / gain, *STRENGTH_RANGE)), gain, len(moved)


def feature_group(name: str, channels) -> str:
    """The group a feature's strength is shared with: its object, kind (AreaShape's sizes
    apart from its other measurements; otherwise the measurement category) and channel, e.g.
    "Nuclei size", "Cells Intensity DNA"."""
    obj, column = object_and_measurement(name)
    parts = column.split("_")
    kind = parts[0]
    if kind == "AreaShape":
        kind = "size" if len(parts) > 1 and parts[1] in SIZES else "shape"
    channel = next((c for c in channels if f"_{c}_" in f"_{column}_"), None)
    return " ".join(p for p in (obj, kind, channel) if p)


def group_strengths(gains: dict, channels, before: dict | None = None) -> dict:
    """group -> strength for the groups with a measured feature the edits move (gain >= MOVED):
    `before` (1 for each group when None) over the group's geometric mean gain, within
    STRENGTH_RANGE. A group none of whose features moves keeps `before`'s strength, if any."""
    found = {}
    for name, g in gains.items():
        if np.isfinite(g) and g >= MOVED:
            found.setdefault(feature_group(name, channels), []).append(np.log(g))
    before = before or {}
    strengths = dict(before)
    for group, logs in found.items():
        start = before.get(group, 1.0)
        strengths[group] = float(np.clip(start / np.exp(np.mean(logs)), *STRENGTH_RANGE))
    return strengths


def strength_vector(names, channels, groups: dict, default: float) -> np.ndarray:
    """[F]: each feature's group strength, `default` for a feature of no measured group."""
    return np.array([groups.get(feature_group(n, channels), default) for n in names], np.float64)


def calibrate_after_fit(run_dir, data_dir, progress: bool) -> dict:
    """`calibrate` at the end of fit: the finished run is kept whatever happens; a calibration
    that cannot be measured leaves the strength at 1 and says why."""
    if progress:
        print("Calibrating the edit strength on validation cells ...", file=sys.stderr)
    try:
        return calibrate(run_dir, data_dir)
    except Exception as err:  # noqa: BLE001 - the run is done; say why, draw at strength 1
        (Path(run_dir) / CALIBRATION).unlink(missing_ok=True)
        print(f"Warning: the edit strength was not calibrated ({type(err).__name__}: {err}); "
              "the model draws at strength 1.", file=sys.stderr)
        return {"strength": 1.0, "error": f"{type(err).__name__}: {err}"}


class Probe:
    """A model's correlated, pinned traversals of validation cells, set up once (cells, their
    real crops re-measured, the features chosen from the data, the profiles) and re-measured
    with cp-measure at any strength vector (`gains`)."""

    def __init__(self, model, data_dir, cells: int, features: int, seed: int):
        from cp2image_tf.evaluation.controllability import (asked_profiles, choose_features,
                                                            fast_plan, pick_cells,
                                                            traversal_origins)
        from cp2image_tf.measuring.remeasure import dataset_segmentation, plan_measurement
        from cp2image_tf.metrics import feature_correlations
        from tfrecords_tools.manifest import matching_manifest, measured_names, treatment_cells
        from tfrecords_tools.reader import DEFAULT_SCALING, sample_cells, stratified_quota

        self.model = model
        manifest = matching_manifest(data_dir, model.feature_names)
        scaling = model.description.get("scaling", DEFAULT_SCALING)
        self.real = sample_cells(data_dir, manifest, "val", stratified_quota(
            treatment_cells(manifest, "val"), REAL_CELLS), scaling, seed)
        reference = sample_cells(data_dir, manifest, "train", stratified_quota(
            treatment_cells(manifest, "train"), 1000), scaling, seed + 1)
        self.channels = measured_names(manifest)
        self.plan = fast_plan(plan_measurement(model.feature_names, self.channels), self.channels)
        self.segmentation, _ = dataset_segmentation(manifest, reference["crops"], scaling,
                                                    self.plan.objects, reference["raw"])
        self.real_measured = self.measure(self.real["crops"])
        inputs = _frame(self.real["raw"], model.feature_names)[self.plan.measurable]
        self.chosen, _ = choose_features(
            feature_correlations(inputs, self.real_measured)["pearson"], self.channels, features)
        self.columns = [model.feature_names.index(c["feature"]) for c in self.chosen]
        raw = self.real["raw"]
        self.origins = traversal_origins(raw, pick_cells(len(raw), cells, seed + 5),
                                         model.median)
        # [cells, features, STEPS, F]: the correlated way of controllability's traversals.
        self.asked = (asked_profiles(model, data_dir, manifest, self.origins, self.columns,
                                     np.linspace(-SPAN, SPAN, STEPS))[0][:, :, 0]
                      if self.chosen and len(self.origins) else None)

    def measure(self, crops):
        from cp2image_tf.measuring.remeasure import remeasure

        return remeasure(crops, self.plan, self.channels, segmentation=self.segmentation)

    def gains(self, strength) -> dict:
        """feature -> gain of the traversals drawn with the change from each pinned profile
        taken `strength` ([F]) times."""
        from cp2image_tf.evaluation.controllability import regression_slope, within_cell_slope

        if self.asked is None:
            return {}
        n_features = self.asked.shape[-1]
        like = np.repeat(self.origins, len(self.columns) * STEPS, axis=0)
        flat = self.asked.reshape(-1, n_features)
        drawn = self.model.edits((like + strength[None] * (flat - like)).astype(np.float32),
                                 like.astype(np.float32))
        measured = self.measure(drawn)
        gains = {}
        for k, (entry, j) in enumerate(zip(self.chosen, self.columns)):
            name = entry["feature"]
            y = measured[name].to_numpy(np.float64).reshape(
                len(self.origins), len(self.columns), STEPS)[:, k]
            slope = float(within_cell_slope(self.asked[:, k, :, j][..., None], y[..., None])[0])
            real_slope = regression_slope(self.real["raw"][:, j],
                                          self.real_measured[name].to_numpy())
            gains[name] = slope / real_slope if real_slope else float("nan")
        return gains


def _finite(value):
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _frame(raw, names):
    import pandas as pd

    return pd.DataFrame(raw, columns=names)
