"""explore's page logic: profiles from a base plus offsets in training SDs, rendering, the
nearest real cells, traversal and interpolation, all as plain Python answers that app.py
turns into HTTP responses.

A profile is a base (`median`, a treatment's mean, or a cell id of DATA_DIR) plus offsets of
some features in training SDs; requests carry it in the query string exactly as the page's
shareable URL does:

    ?base=DMSO&Nuclei_AreaShape_Area=2&Cells_Intensity_MeanIntensity_Actin=-1.5[&alone=1]

With DATA_DIR, the features a slider moves take the features correlated with them along (the
correlated direction `traverse` draws, drawing.traverse.correlated_offsets): the slider shows
what cells with that value look like. `alone=1` moves only the sliders' features. Every picture
of a profile is an edit of the cell its base starts from (the exemplar model's pinned edit,
`like` the base), so a slider changes that cell and never swaps it for another.

Offsets beyond +-OFFSET_LIMIT SDs are clamped, and so are values beyond the training range (an
eccentricity above 1, a negative area): the manifest's min and max of the training split, or
for a dataset converted before manifests had them, the training cells of DATA_DIR read; the
answer says so. Traversal and interpolation strips stay within it too. `extrapolate` lifts the
training range (not the SD limit).

DATA_DIR's training cells (at most `max_cells`, an even share per treatment, the first in
shard order) are read once at start: their features for the nearest-neighbour search and
as cell bases, their crops (as 8-bit) to show.
"""
from __future__ import annotations

import base64
import io
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cp2image_tf.drawing.profiles import treatment_means
from cp2image_tf.drawing.traverse import (base_profile, correlated_offsets, correlations_with,
                                          interpolation_profiles, resolve_feature,
                                          traversal_profiles, training_range, training_z,
                                          within_range)
from cp2image_tf.explore.readout import Readout
from cp2image_tf.serving.local import LocalModel
from cp2image_tf.viz import channel_colours, composite, write_hyperstack
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import feature_name
from tfrecords_tools.manifest import matching_manifest, treatment_cells
from tfrecords_tools.reader import DEFAULT_SCALING, sample_cells, stratified_quota

OFFSET_LIMIT = 5.0  # SDs from the base a feature may move; beyond, values are clamped
MAX_STEPS = 15
MAX_NEIGHBOURS = 12
MAX_CELLS = 20000
RESERVED = frozenset({"base", "feature", "start", "stop", "steps", "correlated", "alone", "k",
                      "a", "b"})
MOVED_SHOWN = 0.05  # SDs: correlated moves smaller than this are not listed on the page
CELL_ID = re.compile(r"^\d+-\d+$")


class ApiError(Exception):
    """A request the page or an API client got wrong (or a server that is not answering)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Base:
    raw: np.ndarray  # float32 [F], non-finite values replaced by the training median
    label: str
    missing: list = field(default_factory=list)  # features that were NaN in the base


@dataclass
class Profile:
    base: str
    label: str
    raw: np.ndarray
    offsets: dict  # feature -> SD offset used (after clamping)
    clamped: list  # {"feature", "asked", "used" (SD offsets), "value" (raw), "note"}
    missing: list
    like: np.ndarray = None  # the base's raw profile: the cell every picture edits
    alone: bool = True  # whether the sliders' features moved alone
    moved_with: list = field(default_factory=list)  # [feature, SD offset]: correlated moves
    why_alone: str | None = None  # why they moved alone though not asked to

    def notes(self) -> list[str]:
        notes = [c["note"] for c in self.clamped]
        if self.why_alone and self.offsets:
            notes.append(self.why_alone)
        if self.missing:
            notes.append(f"{len(self.missing)} feature(s) missing in {self.label} are drawn at the "
                         f"training median ({', '.join(self.missing[:3])}"
                         f"{', ...' if len(self.missing) > 3 else ''}).")
        return notes


@dataclass
class ReferenceCells:
    """DATA_DIR training cells for the nearest-neighbour search and as cell bases."""
    ids: list
    treatments: list
    raw: np.ndarray  # float32 [N, F] as stored (NaN kept)
    crops: np.ndarray  # uint8 [N, H, W, C], scaled as the model was trained
    z: np.ndarray = None  # float32 [N, F]: SD units, for the nearest-neighbour search
    norms: np.ndarray = None  # float32 [N]: squared lengths of z
    position: dict = field(default_factory=dict)


def channel_strip(image) -> bytes:
    """[H, W, C] floats in [0, 1] (or uint8) -> a greyscale PNG [H, W * C]: the channels side by
    side, each round(255 x value), as generate_png rounds."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    h, w, c = image.shape
    strip = np.ascontiguousarray(np.moveaxis(image, -1, 0).transpose(1, 0, 2).reshape(h, c * w))
    out = io.BytesIO()
    Image.fromarray(strip).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def read_reference_cells(data, manifest: dict, model, max_cells: int = MAX_CELLS) -> ReferenceCells:
    """Up to max_cells training cells of DATA_DIR (an even share per treatment, the first ones
    of its shards): ids, treatments, raw features and 8-bit crops scaled as the model's."""
    quota = stratified_quota(treatment_cells(manifest, "train"), max_cells)
    scaling = model.description.get("scaling", DEFAULT_SCALING)
    cells = sample_cells(data, manifest, "train", quota, scaling, uint8=True)
    if not cells["cell_ids"]:
        raise UserInputError(f"{data}: no training cells to show as nearest real cells.")
    return ReferenceCells(cells["cell_ids"], cells["treatments"], cells["raw"], cells["crops"],
                          position={cell: i for i, cell in enumerate(cells["cell_ids"])})


class Explorer:
    """What the page asks of a model: profiles from bases and offsets, cells drawn from them,
    the nearest real cells, traversals and interpolations. Thread-safe."""

    def __init__(self, model, data=None, max_cells: int = MAX_CELLS, progress=None,
                 extrapolate: bool = False, remeasure: bool = True):
        say = progress or (lambda message: None)
        self.model = model
        self.extrapolate = extrapolate
        self.data = str(data) if data is not None else None
        self.remote = not isinstance(model, LocalModel)
        self.names = list(model.feature_names)
        self.position = {name: j for j, name in enumerate(self.names)}
        self.median = np.asarray(model.median, np.float32)
        self.sd = np.asarray(model.sd, np.float32)
        self.unit = np.where(self.sd > 0, self.sd, 1.0).astype(np.float32)
        self.treatments = list(model.description.get("treatments", []))
        self._bases = {"median": Base(self.median.copy(), "the training median cell")}
        self._correlations = {}
        self._z = None  # DATA_DIR's training cells in SD units, for the correlated direction
        self.pinned = bool(getattr(model, "can_pin", False))
        self._strips = {}  # reference cell -> its crop as a channel strip (data URL)
        self._not_found = {}  # cell id -> why it is not in DATA_DIR
        self._lock = threading.Lock()
        self._model_lock = threading.Lock() if self.remote else None
        self.reference = None
        self.low = self.high = None  # per feature, the training cells' lowest and highest values
        self.manifest = matching_manifest(data, self.names) if data is not None else None
        if self.manifest is not None:
            say(f"Reading treatment means from {data} ...")
            means = treatment_means(data, model, ["all"])
            for treatment, row in means.iterrows():
                self._bases[treatment] = self._filled(row.to_numpy(np.float32), f"the {treatment} mean")
            self.treatments = list(means.index)
            say(f"Reading up to {max_cells} training cells of {data} for the nearest real cells ...")
            self.reference = read_reference_cells(data, self.manifest, model, max_cells)
            # Brute force in NumPy (one matrix-vector product): a few ms for 20000 cells, where
            # sklearn's NearestNeighbors.kneighbors spent ~40 ms per query on validation.
            self.reference.z = self.sd_units(self.reference.raw).astype(np.float32)
            self.reference.norms = np.einsum("ij,ij->i", self.reference.z, self.reference.z)
            finite = np.where(np.isfinite(self.reference.raw), self.reference.raw, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features: no bounds
                self.low, self.high = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
        bounds = training_range(getattr(model, "manifest", None), self.manifest)
        if bounds is not None:  # the whole training split's, not only the cells read
            self.low, self.high = (b.astype(np.float32) for b in bounds)
        if extrapolate:
            self.low = self.high = None
        if self.manifest is not None:
            say(f"Reading the features' correlations from {data} ...")
            self._z = training_z(data, model, max_cells)
        self.readout = Readout(self.manifest if remeasure and self.pinned else None, self.names,
                               self.reference,
                               model.description.get("scaling", DEFAULT_SCALING))
        if not remeasure:
            self.readout.unavailable = "re-measuring is switched off (explore's remeasure=False)."
        elif not self.pinned and self.manifest is not None:
            self.readout.unavailable = (
                "re-measuring compares the drawn cell with its base's picture, which needs a "
                "model that edits one chosen cell (a local exemplar model; a model served by "
                "TensorFlow Serving, or one without an exemplar bank, draws the nearest cell "
                "to each profile instead).")
        # The first calls of a signature are slow (graph set-up); make them before the page's.
        self.images(self.median, like=self.median)
        self._call(self.model.pngs, self.median.reshape(1, -1))

    # --- profiles ----------------------------------------------------------------------------

    def sd_units(self, raw) -> np.ndarray:
        """Raw values -> (value - training median) / training SD, missing values at 0."""
        raw = np.asarray(raw, np.float32)
        return (np.where(np.isfinite(raw), raw, self.median) - self.median) / self.unit

    def _filled(self, raw, label: str) -> Base:
        missing = [self.names[j] for j in np.flatnonzero(~np.isfinite(raw))]
        return Base(np.where(np.isfinite(raw), raw, self.median).astype(np.float32), label, missing)

    def base(self, name: str) -> Base:
        """median, a treatment's mean (needs DATA_DIR) or a cell id of DATA_DIR."""
        name = (name or "median").strip()
        with self._lock:
            if name in self._bases:
                return self._bases[name]
        if name in self.treatments or name in self.model.description.get("treatments", []):
            if self.data is None:
                raise ApiError(400, f"base {name}: treatment means need the dataset; start explore "
                                    "with --data DATA_DIR.")
        ref = self.reference
        if ref is not None and name in ref.position:
            found = self._filled(ref.raw[ref.position[name]], f"cell {name}")
        elif self.data is None:
            raise ApiError(400, f"base {name}: not median or a treatment; cell bases need the "
                                "dataset: start explore with --data DATA_DIR.")
        elif not CELL_ID.match(name):
            raise ApiError(404, f"base {name}: not median, a treatment of {self.data} "
                                f"({', '.join(self.treatments)}) or a cell id (<ImageNumber>-"
                                "<ObjectNumber>).")
        else:
            if name in self._not_found:
                raise ApiError(404, self._not_found[name])
            try:
                raw, label = base_profile(self.model, name, self.data)
            except UserInputError as err:
                with self._lock:
                    if len(self._not_found) > 1024:
                        self._not_found.clear()
                    self._not_found[name] = str(err)
                raise ApiError(404, str(err)) from None
            found = self._filled(raw, label)
        with self._lock:
            if len(self._bases) > 512:  # cells looked up one by one; keep the treatments
                for key in [k for k in self._bases if CELL_ID.match(k)][:256]:
                    del self._bases[key]
            self._bases[name] = found
        return found

    def feature(self, name: str) -> str:
        """A feature's full name (exact, case-insensitive or a unique end), else a 400 naming it."""
        if name in self.position:
            return name
        try:
            return resolve_feature(self.model, name)
        except UserInputError as err:
            message = str(err).split(": ", 1)[1].split(" The list is in")[0]
            raise ApiError(400, f"unknown feature {name}: {message}") from None

    def profile(self, params) -> Profile:
        """A Profile from query parameters: base=B and <feature>=<SD offset> pairs."""
        base_name = params.get("base") or "median"
        base = self.base(base_name)
        offsets, clamped = {}, []
        for key, text in params.items():
            if key in RESERVED:
                continue
            name = self.feature(key)
            try:
                asked = float(text)
            except (TypeError, ValueError):
                raise ApiError(400, f"feature {name}: offset {text!r} is not a number of "
                                    "SDs.") from None
            if not math.isfinite(asked):
                raise ApiError(400, f"feature {name}: offset {text!r} is not a finite number of SDs.")
            if not self.sd[self.position[name]] > 0:
                raise ApiError(400, f"feature {name}: its training SD is 0; it cannot be varied.")
            offsets[name] = asked
        raw = base.raw.copy()
        for name, asked in list(offsets.items()):
            j = self.position[name]
            used, value, note = self.allowed(j, base.raw[j], asked)
            raw[j] = value
            if note:
                clamped.append({"feature": name, "asked": asked, "used": round(used, 3),
                                "value": float(value), "note": note})
            if used:
                offsets[name] = round(used, 3) if note else used
            else:
                del offsets[name]
        found = Profile(base_name, base.label, raw, offsets, clamped, base.missing, base.raw)
        wants_alone = str(params.get("alone", "0")).lower() in ("1", "true", "yes", "on")
        if not wants_alone and self._z is None:
            found.why_alone = ("The sliders move their feature alone: moving the features "
                               "correlated with it needs the dataset (start explore with --data "
                               "DATA_DIR).")
        elif not wants_alone and offsets:
            self._move_correlated(found, base.raw)
        return found

    def _move_correlated(self, profile: Profile, origin: np.ndarray) -> None:
        """The features correlated with the sliders' ones moved by their expected change
        (correlated_offsets, as traverse), each within the training range."""
        chosen = [self.position[name] for name in profile.offsets]
        rows = np.stack([self.correlations(j) for j in chosen])
        move = correlated_offsets(rows, chosen, list(profile.offsets.values()))
        others = np.ones(len(self.names), bool)
        others[chosen] = False
        others &= self.sd > 0
        moved = origin.astype(np.float64) + move * self.sd
        moved, _ = self._within_range(moved[None], origin)
        profile.raw = np.where(others, moved[0], profile.raw).astype(np.float32)
        profile.alone = False
        shown = (profile.raw - origin) / self.unit
        order = [k for k in np.argsort(-np.abs(shown), kind="stable")
                 if others[k] and abs(shown[k]) >= MOVED_SHOWN]
        profile.moved_with = [[self.names[k], round(float(shown[k]), 2)] for k in order]

    def allowed(self, j: int, base: float, asked: float):
        """(offset used, raw value, note or None) for feature j moved `asked` SDs from `base`:
        within +-OFFSET_LIMIT SDs and, with DATA_DIR, not past the training cells' values in
        the direction moved (a base already beyond them stays where it is)."""
        name, sd, base = self.names[j], self.sd[j], np.float32(base)
        used = float(np.clip(asked, -OFFSET_LIMIT, OFFSET_LIMIT))
        value = base + np.float32(used) * sd  # float32, as a client computing it in NumPy
        note = None
        if used != asked:
            note = (f"{name}: {asked:+g} SD is beyond the ±{OFFSET_LIMIT:g} SD range; drawn at "
                    f"{used:+g} SD.")
        if self.low is not None and np.isfinite(self.low[j]):
            low, high = self.low[j], self.high[j]
            bounded = min(value, max(high, base)) if used > 0 else max(value, min(low, base))
            # Offsets come in steps of 0.01 SD; a float's last digit is no reason for a note.
            if abs(bounded - value) > 0.005 * sd:
                wanted = value
                used = float((bounded - base) / sd)
                note = (f"{name}: {asked:+g} SD from the base would be {wanted:.4g}, beyond the "
                        f"values of the training cells ({low:.4g} to {high:.4g}); drawn at "
                        f"{bounded:.4g} ({used:+.2f} SD).")
            value = bounded
        return used, np.float32(value), note

    # --- drawing -----------------------------------------------------------------------------

    def _call(self, fn, raw):
        """A model call; a TensorFlow Serving that fails to answer is a 503 with its reason."""
        if not self.remote:
            return fn(raw)
        try:
            with self._model_lock:
                return fn(raw)
        except UserInputError as err:
            raise ApiError(503, f"TensorFlow Serving did not answer: {err}") from None
        except Exception as err:  # noqa: BLE001  (an HTTP client failure of any kind)
            raise ApiError(503, f"TensorFlow Serving did not answer: {type(err).__name__}: "
                                f"{err}") from None

    def images(self, raw, like=None) -> np.ndarray:
        """The model's pictures of raw profiles (as its serving_default draws them); with `like`
        (one raw profile) and a model that edits training cells (the exemplar model), every
        picture edits the cell nearest `like`: a traversal strip shows that cell changing
        instead of the lookup swapping it for another."""
        raw = np.asarray(raw, np.float32).reshape(-1, len(self.names))
        if like is not None and getattr(self.model, "can_pin", False):
            return self._call(lambda r: self.model.edits(r, np.asarray(like, np.float32)), raw)
        return self._call(self.model.images, raw)

    def picture(self, profile: Profile) -> np.ndarray:
        """[H, W, C]: the profile drawn as an edit of its base's cell."""
        return self.images(profile.raw, like=profile.like)[0]

    def png(self, profile: Profile) -> bytes:
        """The colour composite PNG of the picture (as the generate_png signature colours it)."""
        if not self.pinned:
            return self._call(self.model.pngs, profile.raw.reshape(1, -1))[0]
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(composite(self.picture(profile), self.model.channels)).save(out, "PNG")
        return out.getvalue()

    def render(self, params) -> dict:
        profile = self.profile(params)
        start = time.perf_counter()
        image = self.picture(profile)
        model_ms = 1000 * (time.perf_counter() - start)
        return {"strip": data_url(channel_strip(image)), "notes": profile.notes(),
                "clamped": profile.clamped, "offsets": profile.offsets, "base": profile.base,
                "label": profile.label, "model_ms": round(model_ms, 2), "alone": profile.alone,
                "moved_with": profile.moved_with[:8], "moved_with_count": len(profile.moved_with),
                "pinned": self.pinned}

    def remeasured(self, params) -> dict:
        """The moved sliders' features re-measured on the drawn cell (see readout.py), beside
        the values asked, in the features' units."""
        profile = self.profile(params)
        features = list(profile.offsets)
        started = time.perf_counter()
        answer = self.readout.readings(
            features, {f: profile.raw[self.position[f]] for f in features},
            {f: profile.like[self.position[f]] for f in features},
            lambda: self.picture(profile),
            lambda: self.images(profile.like, like=profile.like)[0], profile.base)
        answer["ms"] = round(1000 * (time.perf_counter() - started), 1)
        return answer

    def tiff(self, params) -> bytes:
        out = io.BytesIO()
        write_hyperstack(out, self.picture(self.profile(params)), self.model.channels)
        return out.getvalue()

    def csv(self, params) -> str:
        profile = self.profile(params)
        changed = ", ".join(f"{k} {v:+g} SD" for k, v in profile.offsets.items())
        label = profile.label + (f", {changed}" if changed else "")
        if profile.moved_with:
            label += f" (and {len(profile.moved_with)} correlated features moved with it)"
        table = pd.DataFrame([profile.raw], columns=self.names)
        table.insert(0, "label", [label])
        return table.to_csv(index=False, float_format="%.7g")

    # --- DATA_DIR ----------------------------------------------------------------------------

    def neighbours(self, params, k: int = 6) -> dict:
        ref = self.reference
        if ref is None:
            raise ApiError(400, "the nearest real cells need the dataset: start explore with "
                                "--data DATA_DIR.")
        profile = self.profile(params)
        k = int(np.clip(k, 1, min(MAX_NEIGHBOURS, len(ref.ids))))
        query = self.sd_units(profile.raw).astype(np.float32)
        squared = np.maximum(ref.norms - 2 * (ref.z @ query) + query @ query, 0)
        found = np.argpartition(squared, k - 1)[:k] if k < len(squared) else np.arange(len(squared))
        found = found[np.argsort(squared[found], kind="stable")]
        rms = np.sqrt(squared[found] / len(self.names))
        return {"searched": len(ref.ids), "cells": [
            {"id": ref.ids[i], "treatment": ref.treatments[i], "rms_sd": round(float(d), 3),
             "strip": self._crop_strip(i)} for i, d in zip(found, rms)]}

    def _crop_strip(self, i: int) -> str:
        with self._lock:
            if i in self._strips:
                return self._strips[i]
        strip = data_url(channel_strip(self.reference.crops[i]))
        with self._lock:
            if len(self._strips) > 4096:
                self._strips.clear()
            self._strips[i] = strip
        return strip

    def cells(self, query: str, lookup: bool = False, limit: int = 20) -> dict:
        """Loaded cell ids starting with `query`, and whether `query` is a cell of DATA_DIR
        (with `lookup`, cells outside the loaded ones are searched for by reading DATA_DIR)."""
        query = (query or "").strip()
        ref = self.reference
        if ref is None:
            return {"matches": [], "exact": False, "loaded": 0}
        matches = [c for c in ref.ids if c.startswith(query)][:limit] if query else []
        exact = query in ref.position
        if not exact and lookup and CELL_ID.match(query):
            try:
                self.base(query)  # a cell of another split: found by reading DATA_DIR
                exact = True
            except ApiError:
                exact = False
        return {"matches": matches, "exact": exact, "loaded": len(ref.ids)}

    # --- strips --------------------------------------------------------------------------------

    def _steps(self, params, default: int = 7) -> int:
        try:
            steps = int(params.get("steps", default))
        except ValueError:
            raise ApiError(400, f"steps {params.get('steps')!r}: not a whole number.") from None
        if not 2 <= steps <= MAX_STEPS:
            raise ApiError(400, f"steps {steps}: between 2 and {MAX_STEPS}.")
        return steps

    def _number(self, params, key: str, default: float) -> float:
        try:
            value = float(params.get(key, default))
        except ValueError:
            raise ApiError(400, f"{key} {params.get(key)!r}: not a number of SDs.") from None
        if not math.isfinite(value):
            raise ApiError(400, f"{key} {params.get(key)!r}: not a finite number.")
        return value

    def _frames(self, profiles, labels, values=None, like=None) -> list:
        images = self.images(np.asarray(profiles, np.float32), like)
        return [{"label": label, "strip": data_url(channel_strip(image)),
                 **({"value": float(values[k])} if values is not None else {})}
                for k, (image, label) in enumerate(zip(images, labels))]

    def correlations(self, j: int) -> np.ndarray:
        """Correlation of feature j with every feature over DATA_DIR's training cells."""
        with self._lock:
            if j in self._correlations:
                return self._correlations[j]
        row = correlations_with(self._z, [j])[0]
        with self._lock:
            if len(self._correlations) > 4096:
                self._correlations.clear()
            self._correlations[j] = row
        return row

    def traverse(self, params) -> dict:
        """Steps from `start` to `stop` SDs of one feature around the profile, as
        drawing.traverse draws them: with DATA_DIR the others move by their training
        correlation with it, unless `alone`."""
        if not params.get("feature"):
            raise ApiError(400, "feature: give the feature to traverse.")
        name = self.feature(params["feature"])
        j = self.position[name]
        if not self.sd[j] > 0:
            raise ApiError(400, f"feature {name}: its training SD is 0; it cannot be varied.")
        start, stop = (float(np.clip(self._number(params, key, default), -OFFSET_LIMIT, OFFSET_LIMIT))
                       for key, default in (("start", -2.0), ("stop", 2.0)))
        steps = self._steps(params)
        flag = {key: params.get(key, "0").lower() in ("1", "true", "yes", "on")
                for key in ("correlated", "alone")}
        if flag["correlated"] and self.data is None:
            raise ApiError(400, "correlated: the correlations come from the training cells; start "
                                "explore with --data DATA_DIR.")
        correlated = not flag["alone"] and self._z is not None
        profile = self.profile(params)
        move = (correlated_offsets(self.correlations(j)[None], [j], [1.0]) if correlated
                else np.eye(len(self.names))[j])
        zs = np.linspace(start, stop, steps)
        profiles = traversal_profiles(profile.raw.astype(np.float64), j, move, self.sd, zs)
        profiles, clamped = self._within_range(profiles, profile.raw)
        labels = [f"{z:+.1f} SD" + (f" ({'min' if z < 0 else 'max'})" if c else "")
                  for z, c in zip(zs, clamped[:, j])]
        return {"feature": name, "correlated": correlated, "label": profile.label,
                "frames": self._frames(profiles, labels, profiles[:, j], like=profile.like),
                "range": self._range_note(clamped)}

    def interpolate(self, params) -> dict:
        a, b = params.get("a"), params.get("b")
        if not a or not b:
            raise ApiError(400, "a, b: give two treatments to interpolate between.")
        if self.data is None:
            raise ApiError(400, "interpolation between treatment means needs the dataset: start "
                                "explore with --data DATA_DIR.")
        for name in (a, b):
            if name not in self.treatments:
                raise ApiError(404, f"treatment {name}: not in {self.data}; it has "
                                    f"{', '.join(self.treatments)}.")
        profiles, labels = interpolation_profiles(
            a, self.base(a).raw.astype(np.float64), b, self.base(b).raw.astype(np.float64),
            self._steps(params))
        profiles, clamped = self._within_range(profiles)
        return {"a": a, "b": b,
                "frames": self._frames(profiles, labels, like=profiles[len(profiles) // 2]),
                "range": self._range_note(clamped)}

    def _within_range(self, profiles, origin=None):
        """Strip profiles within the training range (see within_range), unless extrapolating
        or without one; and which values were limited."""
        if self.low is None:
            return profiles, np.zeros(np.shape(profiles), bool)
        return within_range(profiles, (self.low.astype(np.float64), self.high.astype(np.float64)),
                            None if origin is None else np.asarray(origin, np.float64))

    def _range_note(self, clamped) -> str | None:
        if self.low is None:
            return "not limited to the training range" if self.extrapolate else None
        count = int(clamped.any(axis=0).sum())
        return (f"{count} feature(s) stopped at the training range's limits" if count
                else "within the training range")

    # --- description -------------------------------------------------------------------------

    def info(self) -> dict:
        features = []
        for j, name in enumerate(self.names):
            parsed = feature_name(name)
            compartment = parsed.compartment if parsed.compartment is not None else "Other"
            module = parsed.module if parsed.measurement is not None else "Other"
            bounded = self.low is not None and np.isfinite(self.low[j])
            features.append({"name": name, "compartment": compartment, "module": module,
                             "short": parsed.measurement or name,
                             "median": float(self.median[j]), "sd": float(self.sd[j]),
                             "low": float(self.low[j]) if bounded else None,
                             "high": float(self.high[j]) if bounded else None})
        ref = self.reference
        return {
            "source": self.model.source, "remote": self.remote,
            "channels": list(self.model.channels),
            # 'rawGFP (measured as CorrGreen)': the image the features were measured on.
            "channel_labels": list(getattr(self.model, "channel_labels", self.model.channels)),
            "colours": channel_colours(self.model.channels).tolist(),
            "crop": list(self.model.crop_shape), "features": features,
            "treatments": self.treatments if self.data else [],
            "model_treatments": list(self.model.description.get("treatments", [])),
            "data": self.data, "reference_cells": len(ref.ids) if ref else 0,
            "example_cells": ref.ids[:5] if ref else [],
            "offset_limit": OFFSET_LIMIT, "max_steps": MAX_STEPS,
            "extrapolate": self.extrapolate,
            # Sliders move correlated features with theirs (needs DATA_DIR); pictures edit the
            # base's cell (the exemplar model); re-measured readout, or why not.
            "correlated": self._z is not None, "pinned": self.pinned,
            "remeasure": self.readout.unavailable,
        }
