"""Segment single-cell crops and measure them again with cp-measure, under the dataset's names.

`plan_measurement(feature_names, channels)` reads a converted dataset's feature names
(`<Object>_<CellProfiler column>`, e.g. `Nuclei_AreaShape_Area`,
`Cells_Intensity_MeanIntensity_Actin`) and decides which object sets to segment, which
`cp2image_tf.measuring.measure` modules each needs and which features cannot be measured again from a crop.
`remeasure(crops, plan, channels)` segments every crop the same way (`segment`) and measures it
(`measure_masks`): one row per crop, one column per measurable feature, NaN where the object
was not found.

Objects are found by role, from the object set's name: "nucle" -> the nucleus, "cytoplasm" ->
the cell minus its nucleus, "cell" -> the whole cell. `Segmentation` holds the settings every
crop (real, generated, baseline) is segmented with; `dataset_segmentation` makes them for a
converted dataset as a pipeline has them: the nucleus threshold CellProfiler used (Image.csv's
Threshold_FinalThreshold_<nuclei>, brought to the crops' scale) or else one pooled over real
training crops, touching nuclei split (`declump`) at the typical nucleus diameter, and one cell
threshold pooled over real training crops (`fit_cell_threshold`). Without settings each crop is
thresholded at its own Otsu and then half-maximum threshold (`_halfway`). The nucleus (DNA
channel) is the object at the crop centre, or else the one whose centroid is nearest it. The
cell (the other channels' mean) is the component, joined with the nucleus, that holds the
nucleus, shared with any other nucleus in it by a seeded watershed. No nucleus, no cell (as in
CellProfiler, where cells grow from nuclei): a crop without a nucleus gives an all-NaN row.

Features measured on another image than the one cropped (convert's `measured_as`: rawGFP's
features named CorrGreen's) are planned and measured under the measured names
(`tfrecords_tools.manifest.measured_names`).

Pixels are measured as given (crops in [0, 1]): intensity features are on the crops' scale, so
they equal CellProfiler's only for crops scaled as CellProfiler scales (pixel / dtype maximum).

Share of CellProfiler's features that re-measured real test crops reproduce at r >= 0.7
(bench_ceiling.py; 326-330 crops): on the BBBC013 plate (corrected crops), 0.94 of 326 with
this segmentation and 0.77 with each crop's own Otsu threshold and no declumping; on the
synthetic sample, 0.76 of 598 (declumping not chosen there) and 0.74.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import functools
import multiprocessing
import time
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.ndimage
from skimage.filters import threshold_li, threshold_otsu
from skimage.segmentation import watershed

from cp2image_tf.measuring.measure import (GRANULARITY_SPECTRUM, MODULES, TEXTURE_SCALE,
                                           granularity_of_crops, measure_objects)
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import object_and_measurement
from tfrecords_tools.parts import check_options, run_parts

ROLES = ("nucleus", "cell", "cytoplasm")
DNA_NAMES = ("dna", "dapi", "hoechst", "nuc")
SMOOTHING = 1.0  # Gaussian sigma (pixels) before thresholding
GAP = 2  # zero pixels around each crop when crops are tiled for measuring
# Modules whose values depend on where an object lies in the image (granularity: the whole
# image's background and spectrum; Zernike: the enclosing circle, to rounding), so are not
# measured on tiled crops.
PER_CROP = ("zernike", "radial_zernikes", "granularity", "granularity4")
# Of those, the ones measured for a chunk's crops at once, stacked (the same numbers as crop by
# crop): the number of granularity terms of each.
STACKED = {"granularity": GRANULARITY_SPECTRUM, "granularity4": 4}
SCALE_MAX = 65535  # only sets Costes' threshold step (1 / SCALE_MAX); float pixels are not scaled

# CellProfiler measurement categories: the first one in a feature name ends the object name.
# The measure.py modules that can make a column of each category.
_CANDIDATES = {
    "AreaShape": ("sizeshape", "zernike", "feret", "moments"),
    "Intensity": ("intensity",),
    "Texture": ("texture",),
    "Granularity": ("granularity4", "granularity"),
    "RadialDistribution": ("radial_distribution", "radial_zernikes"),
    "Correlation": ("correlation", "manders", "overlap", "rwc", "costes"),
}
_POSITIONAL = {f"AreaShape_{name}" for name in (
    "Center_X", "Center_Y", "Center_Z", "BoundingBoxMinimum_X", "BoundingBoxMinimum_Y",
    "BoundingBoxMaximum_X", "BoundingBoxMaximum_Y")}


@dataclass(frozen=True)
class Plan:
    """What to segment and measure for a list of features.

    `objects`: object set -> role ("nucleus", "cell", "cytoplasm"); `modules`: object set ->
    measure.py modules; `measurable`: the features re-measurement gives, in input order;
    `unmeasurable`: every other feature -> why not.
    """

    objects: dict[str, str]
    modules: dict[str, tuple[str, ...]]
    measurable: list[str]
    unmeasurable: dict[str, str]


def role_of(object_name: str) -> str | None:
    """The segmentation role an object set's name implies, or None."""
    name = object_name.lower()
    if "nucle" in name:
        return "nucleus"
    if "cytoplasm" in name:
        return "cytoplasm"
    if "cell" in name:
        return "cell"
    return None


def plan_measurement(feature_names: list[str], channels: list[str]) -> Plan:
    """Decide what re-measuring crops of `channels` can give of `feature_names`."""
    channels = tuple(channels)
    objects, modules, measurable, unmeasurable = {}, {}, [], {}
    for feature in feature_names:
        obj, column = object_and_measurement(feature)
        reason = _why_not(obj, column, channels)
        if reason:
            unmeasurable[feature] = reason
            continue
        objects.setdefault(obj, role_of(obj))
        modules.setdefault(obj, set()).add(_module_of(column, channels))
        measurable.append(feature)
    if not measurable:
        raise UserInputError(
            f"none of the {len(feature_names)} features can be re-measured from crops: they "
            "need Nuclei/Cells/Cytoplasm objects and AreaShape, Intensity, Texture, "
            "Granularity, RadialDistribution or Correlation columns.")
    for found in modules.values():
        if "granularity" in found:  # the whole spectrum holds the first four terms too
            found.discard("granularity4")
    ordered = {obj: tuple(m for m in MODULES if m in found)
               + tuple(sorted(m for m in found if m not in MODULES))  # texture:<scale>
               for obj, found in modules.items()}
    return Plan(objects, ordered, measurable, unmeasurable)


def _why_not(obj: str | None, column: str, channels: tuple[str, ...]) -> str | None:
    if obj is None:
        return "not an <Object>_<measurement> name"
    if role_of(obj) is None:
        return (f"object set '{obj}' is not nuclei, cells or cytoplasm: only those are "
                "segmented in a crop")
    if column.startswith("Location_") or column in _POSITIONAL:
        return "a position in the field's coordinates, which a crop does not keep"
    if _module_of(column, channels) is None:
        return (f"no cp-measure module makes '{column}' for channels {', '.join(channels)} "
                "(other module or parameters)")
    return None


def _module_of(column: str, channels: tuple[str, ...]) -> str | None:
    candidates = _CANDIDATES.get(column.split("_", 1)[0], ())
    if column.startswith("Texture_"):  # Texture_<feature>_<image>_<scale>_<angle>_<levels>
        scale = column.rsplit("_", 3)[-3] if column.count("_") >= 4 else ""
        if scale.isdigit() and int(scale) != TEXTURE_SCALE:
            candidates = (f"texture:{int(scale)}",)
    for module in candidates:
        if column in _columns(module, channels):
            return module
    return None


@functools.lru_cache(maxsize=None)
def _columns(module: str, channels: tuple[str, ...]) -> frozenset[str]:
    """The columns `module` makes for `channels`: measured on a small drawn object."""
    yy, xx = np.mgrid[:48, :48]
    inside = (yy - 24) ** 2 + (xx - 22) ** 2 <= 100
    images = {ch: np.where(inside, 0.5, 0.05) + 0.02 * (i + 1) * ((xx + i * yy) % 3)
              for i, ch in enumerate(channels)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = measure_objects(images, {"probe": inside.astype(np.int32)}, [module],
                                scale_max=SCALE_MAX)["probe"]
    return frozenset(table.columns)


# ---------------------------------------------------------------------------------------------
# Segmentation


@dataclass(frozen=True)
class Segmentation:
    """How every crop is segmented: the same settings for real, generated and baseline crops.

    `dna`: index of the nucleus channel (None: the first named like DNA, see `dna_channel`).
    `nucleus_threshold` / `cell_threshold`: one threshold of the smoothed DNA / cell signal for
    every crop, on the crops' scale (None: each crop's own). A dataset-level nucleus threshold
    is CellProfiler's own when Image.csv has it (see `cellprofiler_nucleus_threshold`), else
    `fit_nucleus_threshold`'s. `nucleus_diameter`: the typical nucleus diameter in pixels;
    given, touching nuclei are split as IdentifyPrimaryObjects declumps them (`declump`), and
    split pieces whose shared boundary is brighter than `seam` x the dimmer one's peak joined
    again (0: never).
    """

    dna: int | None = None
    nucleus_threshold: float | None = None
    cell_threshold: float | None = None
    nucleus_diameter: float | None = None
    seam: float = 0.0


def segment(crop: np.ndarray, channels: list[str], roles: Mapping[str, str],
            settings: Segmentation | None = None) -> dict[str, np.ndarray]:
    """Label images (int32; 1 = the object, 0 = background; all 0 if not found) per object set.

    `crop`: (H, W, C) float in [0, 1]; `roles`: object set -> "nucleus", "cell" or "cytoplasm"
    (`Plan.objects`); `settings`: see `Segmentation` (default: each crop's own thresholds).
    """
    settings = settings or Segmentation()
    crop = np.asarray(crop, dtype=np.float64)
    if crop.ndim != 3 or crop.shape[2] != len(channels):
        raise ValueError(f"crop must be (H, W, {len(channels)}), got {crop.shape}")
    unknown = sorted(set(roles.values()) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; use {', '.join(ROLES)}")
    dna = dna_channel(channels) if settings.dna is None else settings.dna
    nucleus, nuclei = _nucleus(_smooth(crop[:, :, dna]), settings.nucleus_threshold,
                               settings.nucleus_diameter, settings.seam)
    masks = {"nucleus": nucleus}
    if {"cell", "cytoplasm"} & set(roles.values()):
        cell = _cell(_smooth(_cell_signal(crop, dna)), nucleus, nuclei, settings.cell_threshold)
        masks.update(cell=cell, cytoplasm=cell & ~nucleus)
    return {obj: masks[role].astype(np.int32) for obj, role in roles.items()}


def fit_cell_threshold(crops: np.ndarray, channels: list[str], limit: int = 1000,
                       dna: int | None = None) -> float:
    """One threshold of the cell signal for all crops, from (up to `limit` of) real `crops`.

    Halfway between the medians of Otsu's two classes of the pooled pixels. Crops of dense
    cells hold little background, so a crop's own threshold often separates bright filaments
    from the cell body; a threshold pooled over many crops does not.
    """
    dna = dna_channel(channels) if dna is None else dna
    return _pooled_threshold(crops, channels, limit, lambda crop: _cell_signal(crop, dna))


def fit_nucleus_threshold(crops: np.ndarray, channels: list[str], limit: int = 1000,
                          dna: int | None = None) -> float:
    """One threshold of the DNA channel for all crops, pooled over real `crops` as
    `fit_cell_threshold` pools the cell signal: for data whose Image.csv has no
    Threshold_FinalThreshold_<nuclei>."""
    dna = dna_channel(channels) if dna is None else dna
    return _pooled_threshold(crops, channels, limit, lambda crop: crop[:, :, dna], li=True)


def dataset_segmentation(manifest: dict, crops: np.ndarray, scaling: str,
                         roles: Mapping[str, str], raw: np.ndarray | None = None
                         ) -> tuple[Segmentation, dict]:
    """The segmentation of a converted dataset's crops, scaled as `scaling` says, and where each
    setting came from: the nucleus threshold CellProfiler used (the training images' median of
    Image.csv's Threshold_FinalThreshold_<nuclei>, brought to the crops' scale) or else one
    pooled over the real training `crops`; the typical nucleus diameter from the nuclei's
    AreaShape_EquivalentDiameter (or Area) median in the training split, else measured on the
    crops; the cell threshold pooled over the crops. `roles`: `Plan.objects`. With `raw` (the
    crops' CellProfiler features, in manifest order), how touching nuclei are split is chosen
    on them (`choose_declumping`)."""
    from tfrecords_tools.measured import full_scale
    from tfrecords_tools.reader import crop_scale

    channels = list(manifest["channels"])
    dna = dna_channel(channels)
    objects = list(roles) + list((manifest.get("source") or {}).get("objects") or [])
    nucleus_object = next((o for o in objects if role_of(o) == "nucleus"), None)
    cp = manifest.get("cellprofiler") or {}
    found = (cp.get("thresholds") or {}).get(nucleus_object)
    divisor = crop_scale(manifest, scaling)
    origin = {}
    if found and divisor is not None:
        stored_dtype = np.dtype(manifest["crop"]["dtype"])
        unit = 1.0 if stored_dtype.kind == "f" else full_scale(
            stored_dtype, (cp.get("scaling") or {}).get(channels[dna]))
        nucleus_threshold = found["median"] * unit / float(divisor[dna])
        origin["nucleus_threshold"] = (f"CellProfiler's, Image.csv {found['column']} (median of "
                                       f"{found['images']} training images)")
    else:
        nucleus_threshold = fit_nucleus_threshold(crops, channels, dna=dna)
        origin["nucleus_threshold"] = "pooled over real training crops"
    diameter = _typical_diameter(manifest, nucleus_object)
    origin["nucleus_diameter"] = f"{nucleus_object}_AreaShape median of the training split"
    if diameter is None:
        diameter = _measured_diameter(crops, dna, nucleus_threshold)
        origin["nucleus_diameter"] = "measured on real training crops"
    settings = Segmentation(dna=dna, nucleus_threshold=float(nucleus_threshold),
                            cell_threshold=fit_cell_threshold(crops, channels, dna=dna),
                            nucleus_diameter=diameter, seam=DEFAULT_SEAM)
    origin["cell_threshold"] = "pooled over real training crops"
    origin["declumping"] = f"the default (seam {DEFAULT_SEAM})"
    area = f"{nucleus_object}_AreaShape_Area"
    if raw is not None and area in manifest["features"]["names"] and diameter:
        settings, origin["declumping"] = choose_declumping(
            settings, crops, raw[:, manifest["features"]["names"].index(area)], area)
    return settings, origin


DEFAULT_SEAM = 0.75
DECLUMPING = ((None, 0.0), ("diameter", 0.0), ("diameter", 0.75), ("diameter", 0.9))


def choose_declumping(settings: Segmentation, crops: np.ndarray, areas: np.ndarray, name: str,
                      limit: int = 300) -> tuple[Segmentation, str]:
    """The declumping (none; declumped; declumped with seam 0.75 or 0.9) whose central nuclei in
    (up to `limit`) real training `crops` agree best (Pearson r) with CellProfiler's own areas of
    those cells (`areas`, the `name` feature): the pipeline's own objects decide how touching
    nuclei are to be split, not a setting tuned to one screen."""
    ok = np.flatnonzero(np.isfinite(areas))
    picked = ok[_evenly(len(ok), limit)]
    if len(picked) < 10:
        return settings, f"the default (seam {settings.seam}): too few training cells with {name}"
    smooth = _smoothed(crops, picked, lambda crop: crop[:, :, settings.dna])
    scores = {}
    for diameter, seam in DECLUMPING:
        size = settings.nucleus_diameter if diameter else None
        measured = [_nucleus(s, settings.nucleus_threshold, size, seam)[0].sum() for s in smooth]
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[(diameter, seam)] = float(np.nan_to_num(
                np.corrcoef(measured, areas[picked])[0, 1], nan=-1.0))
    best = max(DECLUMPING, key=lambda k: scores[k])  # ties: the first, the simplest
    chosen = dataclasses.replace(settings, nucleus_diameter=settings.nucleus_diameter
                                 if best[0] else None, seam=best[1])
    said = {(None, 0.0): "none", ("diameter", 0.0): "declumped",
            ("diameter", 0.75): "declumped, seam 0.75", ("diameter", 0.9): "declumped, seam 0.9"}
    listed = ", ".join(f"{said[k]} {v:.2f}" for k, v in scores.items())
    return chosen, (f"{said[best]}: chosen on {len(picked)} training crops by Pearson r of the "
                    f"central nucleus's area with CellProfiler's {name} ({listed})")


def _typical_diameter(manifest: dict, nucleus_object: str | None) -> float | None:
    names = manifest["features"]["names"]
    medians = manifest["features"]["stats"]["median"]
    for measurement, to_diameter in (("EquivalentDiameter", float),
                                     ("Area", lambda a: float(np.sqrt(4 * a / np.pi)))):
        name = f"{nucleus_object}_AreaShape_{measurement}"
        if nucleus_object and name in names and np.isfinite(medians[names.index(name)]):
            return to_diameter(medians[names.index(name)])
    return None


def _measured_diameter(crops: np.ndarray, dna: int, threshold: float,
                       limit: int = 200) -> float | None:
    """The median equivalent diameter of the central nucleus of (up to `limit`) crops."""
    areas = []
    for smooth in _smoothed(crops, _evenly(len(crops), limit), lambda crop: crop[:, :, dna]):
        nucleus, _ = _nucleus(smooth, threshold)
        if nucleus.any():
            areas.append(nucleus.sum())
    return float(np.sqrt(4 * np.median(areas) / np.pi)) if areas else None


def _evenly(n: int, limit: int) -> np.ndarray:
    """Up to `limit` indices spread evenly over range(n)."""
    return np.linspace(0, n - 1, min(limit, n)).astype(int) if n else np.zeros(0, int)


def _smoothed(crops, picked, signal) -> list[np.ndarray]:
    """`signal` of each picked crop (clipped to [0, 1], float64), smoothed as segment smooths."""
    return [_smooth(signal(np.clip(np.asarray(crops[i], np.float64), 0, 1))) for i in picked]


def _pooled_threshold(crops, channels, limit, signal, li: bool = False) -> float:
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[3] != len(channels) or not len(crops):
        raise ValueError(f"crops must be [N > 0, H, W, {len(channels)}], got {crops.shape}")
    pooled = np.stack(_smoothed(crops, _evenly(len(crops), limit), signal))
    if li:  # minimum cross-entropy, IdentifyPrimaryObjects' default: keeps dim nuclei
        return float(threshold_li(pooled))
    otsu = threshold_otsu(pooled)
    return _halfway(pooled, otsu, pooled > otsu)


def dna_channel(channels: list[str]) -> int:
    """Index of the first channel named like DNA (dna, dapi, hoechst, nuc), else 0."""
    for i, ch in enumerate(channels):
        if any(key in ch.lower() for key in DNA_NAMES):
            return i
    return 0


def _cell_signal(crop: np.ndarray, dna: int) -> np.ndarray:
    """The mean of the channels other than DNA (DNA itself if it is the only one)."""
    others = [i for i in range(crop.shape[2]) if i != dna] or [dna]
    return crop[:, :, others].mean(axis=2)


def _smooth(image: np.ndarray) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(image, SMOOTHING)


def _flat(smooth: np.ndarray) -> bool:
    return not np.ptp(smooth) > 1e-6


def _halfway(smooth: np.ndarray, otsu: float, obj: np.ndarray) -> float:
    """Halfway between the background's and the object's median (Otsu's classes): the
    object's half-maximum edge. Otsu's own threshold is pulled toward the larger class by a
    small object's blurred edge (by up to 9% of a drawn disc's area) and, beside a brighter
    object, cuts into a dim one."""
    above, below = smooth[obj & (smooth > otsu)], smooth[smooth <= otsu]
    if not above.size or not below.size:
        return otsu
    return float(np.median(below) + np.median(above)) / 2


def _nucleus(smooth: np.ndarray, threshold: float | None = None,
             diameter: float | None = None, seam: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(the nucleus, every nucleus as a label image). Foreground: above `threshold`, or (None)
    at Otsu's threshold and then at `_halfway`'s; holes filled; with `diameter`, touching
    nuclei split (`declump`). The nucleus is the one at the centre."""
    empty = np.zeros(smooth.shape, bool)
    if threshold is None:
        if _flat(smooth):
            return empty, empty.astype(np.int32)
        otsu = threshold_otsu(smooth)
        first = _central(scipy.ndimage.label(scipy.ndimage.binary_fill_holes(smooth > otsu))[0])
        threshold = _halfway(smooth, otsu, first)
    foreground = scipy.ndimage.binary_fill_holes(smooth > threshold)
    nuclei = declump(foreground, smooth, diameter, seam) if diameter else \
        scipy.ndimage.label(foreground)[0]
    return _central(nuclei), nuclei


def declump(foreground: np.ndarray, image: np.ndarray, diameter: float,
            seam: float = 0.0) -> np.ndarray:
    """Touching nuclei split as IdentifyPrimaryObjects declumps them by default ("Intensity"):
    a watershed of the inverted image, smoothed (sigma a tenth of the typical `diameter`),
    from its maxima, maxima closer than a fifth of the diameter merged. Returns a label image.

    With `seam` > 0, pieces without a dim seam between them are joined again: texture inside
    one nucleus makes maxima too. Measured (Pearson r of Nuclei_AreaShape_Area with
    CellProfiler's, 300 test crops): real BBBC013 crops 0.28 without declumping, 0.82 declumped,
    0.69 with seam 0.75; the synthetic sample's textured nuclei 0.97, 0.69 and 0.92: which one a
    dataset needs, `choose_declumping` decides on its training crops. The distance transform's
    maxima ("Shape") gave 0.35 on BBBC013; smoothing at a seventh or twentieth of the diameter,
    or merging maxima within a third of it, 0.31-0.64.
    """
    from skimage.feature import peak_local_max

    components, n = scipy.ndimage.label(foreground)
    if n == 0:
        return components
    surface = scipy.ndimage.gaussian_filter(image, max(diameter / 10, 0.5))
    peaks = peak_local_max(surface, min_distance=max(1, int(round(diameter / 5))),
                           labels=components, exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = _merge_without_seam(watershed(-surface, markers, mask=foreground), surface, seam)
    orphans = foreground & (labels == 0)  # a component without a maximum keeps itself
    if orphans.any():
        extra, _ = scipy.ndimage.label(orphans)
        labels = np.where(orphans, extra + labels.max(), labels)
    return labels


def _merge_without_seam(labels: np.ndarray, surface: np.ndarray, ratio: float) -> np.ndarray:
    """Pieces of one nucleus merged again: two touching pieces stay apart only where the
    (smoothed) signal along their shared boundary falls below `ratio` times the dimmer piece's
    peak; texture inside one nucleus makes several maxima but no dim seam."""
    if ratio <= 0 or labels.max() < 2:
        return labels
    peak = scipy.ndimage.maximum(surface, labels, np.arange(labels.max() + 1))
    parent = np.arange(labels.max() + 1)

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k

    pairs = {}
    for axis in (0, 1):
        a = labels.take(range(labels.shape[axis] - 1), axis=axis)
        b = labels.take(range(1, labels.shape[axis]), axis=axis)
        s = np.minimum(surface.take(range(labels.shape[axis] - 1), axis=axis),
                       surface.take(range(1, labels.shape[axis]), axis=axis))
        touch = (a > 0) & (b > 0) & (a != b)
        for x, y, v in zip(a[touch], b[touch], s[touch]):
            pairs.setdefault((min(x, y), max(x, y)), []).append(v)
    for (x, y), values in pairs.items():
        if np.median(values) > ratio * min(peak[x], peak[y]):
            parent[root(y)] = root(x)
    roots = np.array([root(k) for k in range(len(parent))])
    return roots[labels]


def _central(labels: np.ndarray) -> np.ndarray:
    """The labelled object at the centre, or else the one whose centroid is nearest it."""
    present = np.unique(labels[labels > 0])
    if present.size == 0:
        return labels > 0
    centre = (labels.shape[0] // 2, labels.shape[1] // 2)
    keep = labels[centre]
    if keep == 0:
        centroids = np.array(scipy.ndimage.center_of_mass(labels > 0, labels, present))
        keep = present[int(np.argmin(((centroids - centre) ** 2).sum(axis=1)))]
    return labels == keep


def _cell(smooth: np.ndarray, nucleus: np.ndarray, nuclei: np.ndarray,
          threshold: float | None) -> np.ndarray:
    # `nuclei`: a label image of every nucleus in the crop.
    """The component of (cell foreground | nucleus), holes filled, that holds the nucleus.

    The foreground is the smoothed signal above `threshold`, or (None) above Otsu's and then
    `_halfway`'s threshold. When the component holds other nuclei (touching cells), it is
    shared among them as CellProfiler shares secondary objects: each pixel goes to the nucleus
    it is closest to through the component (a seeded watershed on the distance to the nuclei).
    """
    if not nucleus.any():
        return nucleus
    if threshold is None:
        if _flat(smooth):
            return nucleus
        otsu = threshold_otsu(smooth)
        threshold = _halfway(smooth, otsu, _holding(smooth > otsu, nucleus))
    cell = _holding(smooth > threshold, nucleus)
    seeds = np.where(cell, nuclei, 0)
    seeds[nucleus] = seeds.max() + 1  # the nucleus is one seed, whatever else touches it
    if len(np.unique(seeds[seeds > 0])) < 2:
        return cell
    distance = scipy.ndimage.distance_transform_edt(seeds == 0)
    return watershed(distance, seeds, mask=cell) == seeds.max()


def _holding(foreground: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """The component of (foreground | nucleus), holes filled, that holds the nucleus."""
    components, _ = scipy.ndimage.label(scipy.ndimage.binary_fill_holes(foreground | nucleus))
    return components == components[nucleus][0]


# ---------------------------------------------------------------------------------------------
# Measuring


def measure_masks(crop: np.ndarray, masks: Mapping[str, np.ndarray], plan: Plan,
                  channels: list[str]) -> dict[str, float]:
    """{feature: value} for `plan.measurable` from one crop and its masks (NaN: no object).

    The values remeasure gives for the crop when `masks` are `segment`'s.
    """
    crop = np.clip(np.asarray(crop, dtype=np.float64), 0.0, 1.0)
    row = _measure_batch(crop[None], [masks], plan, channels)[0]
    return dict(zip(plan.measurable, row.tolist()))


def remeasure(crops: np.ndarray, plan: Plan, channels: list[str], workers: int = 1,
              progress: bool = False, chunk: int = 32,
              segmentation: Segmentation | None = None, scheduler: str | None = None,
              client=None) -> pd.DataFrame:
    """Segment and measure every crop: [N rows, plan.measurable columns] float64, NaN if not found.

    `crops`: [N, H, W, C] floats in [0, 1] (values outside are clipped). workers > 1 measures
    chunks of `chunk` crops in that many spawned processes; `scheduler` measures them on Dask
    ("local": a LocalCluster of `workers` processes on 127.0.0.1, or a scheduler's address; see
    tfrecords_tools.parts), `client` on an open distributed.Client. The values do not depend
    on `workers` or `scheduler` (nor, but for rounding, on `chunk`). `segmentation`: see
    `Segmentation` (default: each crop's own thresholds, nuclei not declumped).
    """
    from tqdm.auto import tqdm

    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[3] != len(channels):
        raise ValueError(f"crops must be [N, H, W, {len(channels)}], got {crops.shape}")
    if not np.issubdtype(crops.dtype, np.floating):
        raise ValueError(f"crops must be floats in [0, 1], got {crops.dtype}")
    chunk = max(1, int(chunk))
    tasks = [(crops[s:s + chunk], plan, list(channels), segmentation)
             for s in range(0, len(crops), chunk)]
    results: list[np.ndarray | None] = [None] * len(tasks)
    if scheduler is not None or client is not None:
        if scheduler not in (None, "local"):
            workers = 1  # a running cluster has its own workers
        check_options(scheduler, workers)
        keys = []
        for k, task in enumerate(tasks):
            digest = hashlib.sha256(np.ascontiguousarray(task[0]).tobytes())
            digest.update(repr((task[0].shape, str(task[0].dtype), plan, task[2],
                                segmentation)).encode())
            keys.append(f"remeasure-{k:06d}-{digest.hexdigest()[:16]}")
        for k, done in run_parts(_measure_chunk, tasks, keys, cells=lambda done: len(done[0]),
                                 scheduler=scheduler,
                                 workers=workers, progress=progress, desc="remeasure",
                                 unit="chunk", client=client, total_cells=len(crops)):
            results[k] = done
        return _frame(results, plan)
    workers = max(1, min(int(workers), len(tasks)))
    with tqdm(total=len(crops), desc="remeasure", unit="cell", disable=not progress) as bar:
        if workers == 1:
            for k, task in enumerate(tasks):
                results[k] = _measure_chunk(task)
                bar.update(len(task[0]))
        else:
            context = multiprocessing.get_context("spawn")  # never fork a TensorFlow process
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_measure_chunk, task): k for k, task in enumerate(tasks)}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        k = futures[future]
                        results[k] = future.result()
                        bar.update(len(tasks[k][0]))
                finally:
                    for future in futures:
                        future.cancel()
    return _frame(results, plan)


def _frame(results: list[tuple[np.ndarray, dict]], plan: Plan) -> pd.DataFrame:
    """The chunks' rows as remeasure's frame; attrs["seconds"]: the CPU seconds segmenting and
    measuring, summed over the chunks (and so over the workers)."""
    rows = (np.concatenate([r for r, _ in results]) if results
            else np.zeros((0, len(plan.measurable))))
    frame = pd.DataFrame(rows, columns=plan.measurable, dtype=np.float64)
    frame.attrs["seconds"] = {key: float(sum(t[key] for _, t in results))
                              for key in ("segment_seconds", "measure_seconds")}
    return frame


def _measure_chunk(task: tuple) -> tuple[np.ndarray, dict]:
    """([n, features], {"segment_seconds", "measure_seconds"}: the CPU seconds of each) for a
    chunk of crops (run in a worker process, or in this one)."""
    crops, plan, channels, segmentation = task
    with one_blas_thread():
        start = time.process_time()
        crops = np.clip(np.asarray(crops, dtype=np.float64), 0.0, 1.0)
        masks = [segment(crop, channels, plan.objects, segmentation) for crop in crops]
        segmented = time.process_time()
        rows = _measure_batch(crops, masks, plan, channels)
        return rows, {"segment_seconds": segmented - start,
                      "measure_seconds": time.process_time() - segmented}


def one_blas_thread():
    """numpy's BLAS in one thread, for as long as the context lasts (TensorFlow's threads and
    OpenMP's are left alone).

    Processes are how measuring runs in parallel; inside one, OpenBLAS's own threads only wait
    for a core. On this 2-core machine beside a training run, a 326-feature eigendecomposition
    took 0.67 s with OpenBLAS's two threads and 0.02 s with one (evaluate's Fréchet distances,
    KID and classifier spent most of their time so)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _measure_batch(crops: np.ndarray, masks: list[Mapping[str, np.ndarray]], plan: Plan,
                   channels: list[str]) -> np.ndarray:
    """[n, features] for crops [n, H, W, C] and their masks.

    Most modules measure an object from its own pixels alone, so the crops are tiled, GAP zero
    pixels apart, into one image (crop j's objects labelled j + 1) and measured in one
    measure_objects call; a lone crop (measure_masks) is measured in the same zero frame.
    The PER_CROP modules are measured crop by crop, on the crop as it is (granularity for the
    chunk's crops stacked, measure.granularity_of_crops: the same numbers). A module that raises
    on a crop (cp-measure on a degenerate object) leaves that crop's features of it NaN, with
    a RuntimeWarning.
    """
    n = len(crops)
    needed = {m for found in plan.modules.values() for m in found}
    if "granularity" in needed:
        needed.discard("granularity4")  # the same first four terms
    tiled = [m for m in MODULES if m in needed and m not in PER_CROP] + sorted(
        m for m in needed if m not in MODULES)  # texture:<scale>
    single = [m for m in MODULES if m in needed and m in PER_CROP and m not in STACKED]
    stacked = [m for m in MODULES if m in needed and m in STACKED]
    targets = {obj: [] for obj in plan.objects}  # object set -> [(output column, its column)]
    for k, feature in enumerate(plan.measurable):
        obj, column = object_and_measurement(feature)
        targets[obj].append((k, column))
    out = np.full((n, len(plan.measurable)), np.nan)
    failed: dict[str, str] = {}
    with warnings.catch_warnings():  # cp-measure warns on undefined values; they are NaN
        warnings.simplefilter("ignore")
        if tiled:
            chunk_failed = _measure(_tile(crops, masks, channels, plan.objects), tiled, out,
                                    targets, np.arange(n))
            if chunk_failed and n > 1:  # crop by crop: only the crops a module fails on lose it
                retry, chunk_failed = [m for m in tiled if m in chunk_failed], {}
                for j in range(n):
                    chunk_failed.update(_measure(
                        _tile(crops[j:j + 1], masks[j:j + 1], channels, plan.objects), retry,
                        out, targets, np.array([j])))
            failed.update(chunk_failed)
        for j in range(n):
            present = {obj: np.asarray(masks[j][obj], np.int32) for obj in plan.objects
                       if np.any(masks[j][obj])}
            if single and present:
                images = {ch: crops[j, :, :, i] for i, ch in enumerate(channels)}
                failed.update(_measure((images, present), single, out, targets, np.array([j])))
        for module in stacked:
            failed.update(_measure_stacked(crops, masks, module, plan, channels, out, targets))
    for message in failed.values():
        warnings.warn(message, RuntimeWarning)
    return out


def _measure_stacked(crops: np.ndarray, masks: list[Mapping[str, np.ndarray]], module: str,
                     plan: Plan, channels: list[str], out: np.ndarray, targets: dict
                     ) -> dict[str, str]:
    """A STACKED module of every crop with an object, at once, into `out`; if that raises,
    crop by crop as _measure does (only the crops it fails on lose it)."""
    rows, labels = [], []
    for j, found in enumerate(masks):
        present = {obj: _contiguous_one(found[obj]) for obj in plan.objects if np.any(found[obj])}
        if present:
            rows.append(j)
            labels.append(present)
    if not rows:
        return {}
    try:
        values = granularity_of_crops(
            {ch: np.ascontiguousarray(crops[rows, :, :, i]) for i, ch in enumerate(channels)},
            labels, STACKED[module])
    except Exception:  # noqa: BLE001 - as _measure: the crops that fail, found one by one
        failed = {}
        for j, present in zip(rows, labels):
            images = {ch: crops[j, :, :, i] for i, ch in enumerate(channels)}
            failed.update(_measure((images, present), [module], out, targets, np.array([j])))
        return failed
    for j, found in zip(rows, values):
        for obj, columns in found.items():
            for k, column in targets[obj]:
                if column in columns:
                    out[j, k] = columns[column][0]
    return {}


def _contiguous_one(mask: np.ndarray) -> np.ndarray:
    """A crop's mask of one object set as measure_objects labels it: int32, the object 1."""
    mask = np.asarray(mask, np.int32)
    if mask.max() != 1 or mask.min() < 0:
        raise ValueError(f"a crop's mask must hold its one object as label 1, got labels "
                         f"{np.unique(mask).tolist()}")
    return mask


def _tile(crops: np.ndarray, masks: list[Mapping[str, np.ndarray]], channels: list[str],
          objects: Mapping[str, str]) -> tuple[dict, dict]:
    """(images, labels) of the crops tiled GAP pixels apart; crop j's objects are label j + 1."""
    n, h, w, c = crops.shape
    per_row = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / per_row))
    image = np.zeros((rows * (h + GAP) + GAP, per_row * (w + GAP) + GAP, c))
    labels = {obj: np.zeros(image.shape[:2], np.int32) for obj in objects}
    for j in range(n):
        y, x = GAP + (j // per_row) * (h + GAP), GAP + (j % per_row) * (w + GAP)
        image[y:y + h, x:x + w] = crops[j]
        for obj in objects:
            labels[obj][y:y + h, x:x + w] = np.asarray(masks[j][obj]) * (j + 1)
    return {ch: image[:, :, i] for i, ch in enumerate(channels)}, labels


def _measure(field: tuple[dict, dict], modules: list[str], out: np.ndarray, targets: dict,
             crop_rows: np.ndarray) -> dict[str, str]:
    """measure_objects into `out`, module by module if it raises: {module: error} that failed.

    (ObjectNumber k is the crop at crop_rows[k - 1].)
    """
    if not modules:
        return {}
    images, labels = field
    try:
        tables = measure_objects(images, labels, modules, scale_max=SCALE_MAX)
    except Exception as err:  # noqa: BLE001 - cp-measure raises many types on odd objects
        if len(modules) == 1:
            return {modules[0]: f"cp-measure's {modules[0]} failed on a crop "
                                f"({type(err).__name__}: {err}); its features are NaN there"}
        return {m: msg for module in modules
                for m, msg in _measure(field, [module], out, targets, crop_rows).items()}
    for obj, table in tables.items():
        pairs = [(k, col) for k, col in targets[obj] if col in table.columns]
        if pairs and len(table):
            rows = crop_rows[table["ObjectNumber"].to_numpy() - 1]
            out[np.ix_(rows, [k for k, _ in pairs])] = \
                table[[col for _, col in pairs]].to_numpy(np.float64)
    return {}
