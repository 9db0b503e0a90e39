"""explore's re-measured readout: how far a drawn cell moved the features its sliders asked for.

The drawn cell is segmented and measured with cp-measure, as evaluate measures crops (one
segmentation for the dataset: `measuring.remeasure.dataset_segmentation`), for the moved
features only (tens of milliseconds for one crop). The reading is relative, so that
cp-measure's own scale (intensities on the crops' scale, not CellProfiler's) cancels: the
change from the drawing of the base profile to the drawing of the moved one, brought to the
feature's units by the slope of cp-measure's value on CellProfiler's over real training crops
(`Calibration`):

    re-measured = base value + (measured(drawn) - measured(base drawing)) / slope

A picture that changes as a real cell with the asked value would re-measure reads the asked
value; a picture that does not change reads the base value.

It needs DATA_DIR (the segmentation's thresholds and the real crops the slopes come from).
The calibration (re-measuring up to CALIBRATION_CELLS real crops) runs in a thread at start;
readings wait for it.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np

from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import measured_names

CALIBRATION_CELLS = 300
MIN_CELLS = 20  # real crops with the feature found, for a slope
WEAK = 0.5  # |r| of cp-measure's value with CellProfiler's on real crops under which a reading is flagged


@dataclass
class Calibration:
    """Per measurable feature: slope of cp-measure's value on CellProfiler's over real
    training crops (0 where unknown), their correlation, and how many crops had it."""
    slope: dict
    r: dict
    cells: dict


def calibrate(table: np.ndarray, measured: np.ndarray, names) -> Calibration:
    """Slopes of `measured` [N, K] (cp-measure) on `table` [N, K] (CellProfiler), per column."""
    slope, r, cells = {}, {}, {}
    for k, name in enumerate(names):
        x, y = np.asarray(table[:, k], np.float64), np.asarray(measured[:, k], np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        cells[name] = int(ok.sum())
        x, y = x[ok], y[ok]
        if ok.sum() < MIN_CELLS or not x.std() > 0 or not y.std() > 0:
            slope[name], r[name] = 0.0, float("nan")
            continue
        covariance = np.mean((x - x.mean()) * (y - y.mean()))
        slope[name] = float(covariance / x.var())
        r[name] = float(covariance / (x.std() * y.std()))
    return Calibration(slope, r, cells)


class Readout:
    """Re-measures drawn cells for explore (thread-safe). `unavailable` says why it cannot
    (then every reading says so)."""

    def __init__(self, manifest: dict | None, names, reference=None, scaling: str = "dataset",
                 background: bool = True):
        self.names = list(names)
        self.unavailable = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._base = {}  # (base key, feature) -> measured value of the base drawing
        self.calibration = None
        if manifest is None or reference is None:
            self.unavailable = ("re-measuring the drawn cell needs the dataset (its segmentation "
                                "thresholds and real cells to calibrate on): start explore with "
                                "--data DATA_DIR.")
            self._ready.set()
            return
        self.manifest, self.channels = manifest, measured_names(manifest)
        try:
            from cp2image_tf.measuring.remeasure import plan_measurement

            self.plan = plan_measurement(self.names, self.channels)
        except UserInputError as err:
            self.unavailable = f"re-measuring: {err}"
            self._ready.set()
            return
        work = threading.Thread(target=self._prepare, args=(reference, scaling), daemon=True,
                                name="explore-calibration")
        if background:
            work.start()
        else:
            work.run()

    def _prepare(self, reference, scaling) -> None:
        """The dataset's segmentation and the slopes, from up to CALIBRATION_CELLS real crops."""
        from cp2image_tf.measuring.remeasure import dataset_segmentation, remeasure

        try:
            picked = np.unique(np.linspace(0, len(reference.ids) - 1,
                                           min(CALIBRATION_CELLS, len(reference.ids))).astype(int))
            crops = reference.crops[picked].astype(np.float32) / 255.0
            raw = reference.raw[picked]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.segmentation, _ = dataset_segmentation(self.manifest, crops, scaling,
                                                            self.plan.objects, raw)
                measured = remeasure(crops, self.plan, self.channels,
                                     segmentation=self.segmentation).to_numpy()
            columns = [self.names.index(name) for name in self.plan.measurable]
            self.calibration = calibrate(raw[:, columns], measured, self.plan.measurable)
        except Exception as err:  # noqa: BLE001  (the page says why; the rest of explore works)
            self.unavailable = f"re-measuring could not be prepared ({type(err).__name__}: {err})."
        finally:
            self._ready.set()

    def measure(self, image: np.ndarray, features) -> dict:
        """{feature: cp-measure's value} of one drawn cell [H, W, C] for measurable features."""
        from cp2image_tf.measuring.remeasure import plan_measurement, remeasure

        features = [f for f in features if f in self.calibration.slope]
        if not features:
            return {}
        plan = plan_measurement(features, self.channels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = remeasure(np.asarray(image, np.float32)[None], plan, self.channels,
                            segmentation=self.segmentation).iloc[0]
        return {name: float(row[name]) for name in plan.measurable}

    def readings(self, features, asked: dict, base_value: dict, drawn, base_drawing,
                 base_key: str, timeout: float = 120.0) -> dict:
        """{"available", "why", "features": [...]} for the moved `features`: asked and
        re-measured values in the feature's units, and a note where the reading is weak or
        missing. `drawn`, `base_drawing`: functions drawing the pictures ([H, W, C]) of the
        moved and of the base profile (the base's is drawn only when not cached under
        `base_key`)."""
        if not self._ready.wait(timeout):
            return {"available": False, "why": "re-measuring is still being prepared (calibrating "
                                               "on the dataset's real cells); try again.",
                    "features": []}
        if self.unavailable:
            return {"available": False, "why": self.unavailable, "features": []}
        measured = self.measure(drawn(), features) if features else {}
        with self._lock:
            missing = [f for f in measured if (base_key, f) not in self._base]
        if missing:
            found = self.measure(base_drawing(), missing)
            with self._lock:
                if len(self._base) > 4096:
                    self._base.clear()
                self._base.update({(base_key, f): v for f, v in found.items()})
        with self._lock:
            before = {f: self._base.get((base_key, f), np.nan) for f in measured}
        return {"available": True, "why": None,
                "features": [self._reading(f, asked[f], base_value[f], measured.get(f),
                                           before.get(f)) for f in features]}

    def _reading(self, name, asked, base, drawn, before) -> dict:
        entry = {"feature": name, "asked": float(asked), "base": float(base), "measured": None,
                 "r": None, "note": None}
        if name in self.plan.unmeasurable:
            entry["note"] = f"not re-measured from a crop: {self.plan.unmeasurable[name]}"
            return entry
        slope, r = self.calibration.slope[name], self.calibration.r[name]
        entry["r"] = None if not np.isfinite(r) else round(r, 3)
        if not slope:
            entry["note"] = (f"not re-measured: on {self.calibration.cells[name]} real cells "
                             "cp-measure does not follow this feature")
            return entry
        if drawn is None or not (np.isfinite(drawn) and np.isfinite(before)):
            entry["note"] = "the object was not found in the drawn cell"
            return entry
        entry["measured"] = float(base + (drawn - before) / slope)
        if abs(r) < WEAK:
            entry["note"] = f"a weak reading: on real cells re-measurement follows it at r {r:.2f}"
        return entry
