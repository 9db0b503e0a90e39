"""CellProfiler per-object measurements computed with cp-measure, named as CellProfiler names them.

`measure_objects(images, masks)` measures every labelled object of one field and returns one
pandas DataFrame per object set, laid out like a CellProfiler ExportToSpreadsheet object table:
`ObjectNumber`, `Location_Center_X`, `Location_Center_Y` (the label's centroid; x = column,
y = row, pixels) and the measurement columns, e.g. `AreaShape_Area`, `AreaShape_Zernike_2_0`,
`Intensity_MeanIntensity_DNA`, `Texture_Contrast_DNA_3_00_256`, `Granularity_1_DNA`,
`RadialDistribution_FracAtD_DNA_1of4`, `Correlation_Correlation_DNA_Tubulin`.
`measure_crop(crop, channel_names, mask)` does the same for one (H, W, C) crop, which is how
generated cells are measured again.

Images are 2-D floats in [0, 1] (CellProfiler's convention: integers divided by their dtype's
maximum); intensity features are computed on that scale, as CellProfiler does.

Modules (`MODULES`; pick any by name, or `ALL_MODULES`, or `DEFAULT_MODULES`):

    sizeshape            AreaShape_*: CellProfiler's standard size and shape features
    moments              AreaShape_{Spatial,Central,Normalized,Hu}Moment_*, InertiaTensor*
                         (CellProfiler's "advanced" shape features)
    zernike              AreaShape_Zernike_<n>_<m>, n <= 9
    feret                AreaShape_MinFeretDiameter, AreaShape_MaxFeretDiameter
    intensity            Intensity_<feature>_<ch>, Location_{CenterMass,Max}Intensity_<X|Y|Z>_<ch>
    texture              Texture_<feature>_<ch>_3_<00..03>_256 (Haralick: scale 3, 4 angles)
    granularity          Granularity_<1..16>_<ch> (CellProfiler's default spectrum)
    granularity4         Granularity_<1..4>_<ch>: the first four terms of that same spectrum
    radial_distribution  RadialDistribution_{FracAtD,MeanFrac,RadialCV}_<ch>_<k>of4
    radial_zernikes      RadialDistribution_Zernike{Magnitude,Phase}_<ch>_<n>_<m>
    correlation          Correlation_{Correlation,Slope}_<a>_<b> for each channel pair
    manders              Correlation_Manders_<a>_<b> and _<b>_<a>
    overlap              Correlation_Overlap_<a>_<b>, Correlation_K_<a>_<b> and _<b>_<a>
    rwc                  Correlation_RWC_<a>_<b> and _<b>_<a>
    costes               Correlation_Costes_<a>_<b> and _<b>_<a>

Channel pairs (a, b) follow the order the channels are given in, as CellProfiler's
MeasureColocalization pairs them. Parameters are CellProfiler's defaults throughout; intensity
quartiles use CellProfiler's own percentile convention (cp-measure's `legacy=True`). Granularity
and radial distribution are computed here, following cp-measure's code, so that what does not
depend on the object set (granularity's spectrum of a channel) or on the channel (an object's
radial geometry) is computed once; the values equal cp-measure's (tests/test_measure.py checks).
The granularity spectrum is built term by term, each from the one before, so `granularity4` gives
exactly the first four values of `granularity` at about a third of the cost.

Cost on this machine (2 vCPU, Python 3.11, cp-measure 0.3.0): CPU ms per cell of sample-data
fields (512x512, ~24 cells; nucleus radius ~10 px, cell ~26 px), nucleus and cell both measured,
three channels, one process; the smallest of 3-4 rounds, which still vary by +-30% with the load
other processes put on the machine. "numba": with numba installed (see BACKEND below).

    module               numpy  numba      module               numpy  numba
    sizeshape              3.6             granularity           15-17
    moments                4.0             granularity4            5
    zernike                3.4             radial_distribution   4-5.5
    feret                  1.0    0.9      radial_zernikes         9
    intensity              3.1    1.6-2    correlation           1.5
    texture               8-14    1.2-1.8  manders, overlap      0.8 each
                                           rwc                   2.5-3
                                           costes               35-49
    DEFAULT_MODULES         35     18      ALL_MODULES        100-120  85-95

(`python benchmarks/bench_measure.py 7 4`.) So DEFAULT_MODULES measure 2,000 cells in ~70 s of
CPU without numba and ~36 s with it; a second process adds 0-20% on this machine. They drop what
is slow or rarely used: Costes (the slowest by far, and its thresholds cannot be re-measured from
a crop), granularity terms 5-16, radial Zernikes, the advanced moments and the correlations.
Texture is the largest cost left without numba (mahotas' Haralick code, ~1.5 ms per object and
channel); numba's compiled kernels make it the smallest.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
from typing import Callable, Iterable

import centrosome.propagate
import numpy as np
import pandas as pd
import scipy.ndimage
import scipy.sparse
import skimage.morphology
from cp_measure.core import (
    measureobjectintensity,
    measureobjectintensitydistribution,
    measureobjectsizeshape,
    measuretexture,
)
from skimage.segmentation import relabel_sequential

from tfrecords_tools.errors import UserInputError

# cp-measure's compiled kernels for texture, intensity and Feret diameters are used when numba is
# installed (6x, 2.6x and 2x faster here; the same values, but for which of two equally bright
# pixels Location_MaxIntensity points at). They compile once per environment, then are cached.
if importlib.util.find_spec("numba") is not None:
    from cp_measure.core.numba._feret import get_feret
    from cp_measure.core.numba.measureobjectintensity import get_intensity
    from cp_measure.core.numba.measuretexture import get_texture
    BACKEND = "numba"
else:
    get_feret = measureobjectsizeshape.get_feret
    get_intensity = measureobjectintensity.get_intensity
    get_texture = measuretexture.get_texture
    BACKEND = "numpy"

MODULES = {
    "sizeshape": "AreaShape_*: standard size and shape features",
    "moments": "AreaShape_*Moment_* and InertiaTensor*: CellProfiler's advanced shape features",
    "zernike": "AreaShape_Zernike_<n>_<m>",
    "feret": "AreaShape_MinFeretDiameter, AreaShape_MaxFeretDiameter",
    "intensity": "Intensity_<feature>_<channel>, Location_*Intensity_*_<channel>",
    "texture": "Texture_<feature>_<channel>_3_<angle>_256 (texture:<scale> for another scale)",
    "granularity": "Granularity_<1..16>_<channel>",
    "granularity4": "Granularity_<1..4>_<channel> (the first terms of the same spectrum)",
    "radial_distribution": "RadialDistribution_{FracAtD,MeanFrac,RadialCV}_<channel>_<k>of4",
    "radial_zernikes": "RadialDistribution_Zernike{Magnitude,Phase}_<channel>_<n>_<m>",
    "correlation": "Correlation_{Correlation,Slope}_<a>_<b>",
    "manders": "Correlation_Manders_<a>_<b>",
    "overlap": "Correlation_Overlap_<a>_<b>, Correlation_K_<a>_<b>",
    "rwc": "Correlation_RWC_<a>_<b>",
    "costes": "Correlation_Costes_<a>_<b>",
}

DEFAULT_MODULES = (
    "sizeshape", "zernike", "feret", "intensity", "texture", "granularity4", "radial_distribution",
)
"""Fast modules that still give every family CellProfiler users rely on (see the module doc)."""

ALL_MODULES = tuple(name for name in MODULES if name != "granularity4")
"""Every cp-measure module, with CellProfiler's default parameters."""

TEXTURE_SCALE = 3
TEXTURE_GRAY_LEVELS = 256
GRANULARITY_SPECTRUM = 16
RADIAL_BINS = 4
CORRELATION_THRESHOLD = 15  # percent of each object's maximum, as in CellProfiler


def resolve_modules(modules: str | Iterable[str]) -> tuple[str, ...]:
    """Module names, checked: "all" and "default" expand; anything unknown is a UserInputError."""
    if isinstance(modules, str):
        modules = [modules]
    names: list[str] = []
    for name in modules:
        key = name.strip().lower()
        expanded = {"all": ALL_MODULES, "default": DEFAULT_MODULES}.get(key, (key,))
        for item in expanded:
            if item not in MODULES and texture_scale(item) is None:
                raise UserInputError(f"unknown measurement module '{name}' (--modules): choose "
                                     f"from {', '.join(MODULES)}, or 'all' or 'default'.")
            if item not in names:
                names.append(item)
    if not names:
        raise UserInputError("no measurement modules given (--modules): name at least one of "
                             f"{', '.join(MODULES)}.")
    return tuple(names)


def measure_objects(images: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                    modules: str | Iterable[str] = DEFAULT_MODULES, *,
                    scale_max: int = 65535) -> dict[str, pd.DataFrame]:
    """Measure every object of one field; one DataFrame per object set, one row per label.

    `images`: channel name -> 2-D float image in [0, 1]. `masks`: object name -> 2-D integer
    label image of the same shape (0 = background; a label is the ObjectNumber). `scale_max`
    is the integer range the images came from; only Costes' threshold search uses it.
    """
    modules = resolve_modules(modules)
    channels = list(images)
    pixels = {ch: np.asarray(img, dtype=np.float64) for ch, img in images.items()}
    shapes = {np.shape(a) for a in [*pixels.values(), *masks.values()]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"images and masks must be 2-D and of one shape, got {sorted(shapes)}")

    labels, numbers = {}, {}
    for name, mask in masks.items():
        labels[name], numbers[name] = _contiguous(np.asarray(mask))

    present = {name: lab for name, lab in labels.items() if numbers[name].size}
    columns: dict[str, dict[str, np.ndarray]] = {name: {} for name in masks}
    for name, lab in present.items():
        columns[name].update(_centers(lab, numbers[name].size))
    for module in modules:
        for name, values in _measurer(module)(present, pixels, channels, scale_max).items():
            columns[name].update(values)

    tables = {}
    for name in masks:
        table = pd.DataFrame({"ObjectNumber": numbers[name]})
        if name in present:
            data = pd.DataFrame({col: np.asarray(v, dtype=np.float64)
                                 for col, v in columns[name].items()})
            table = pd.concat([table, data], axis=1)
        tables[name] = table
    return tables


def measure_crop(crop: np.ndarray, channel_names: list[str], mask: np.ndarray,
                 modules: str | Iterable[str] = DEFAULT_MODULES, *,
                 scale_max: int = 65535) -> pd.DataFrame:
    """Measure the object(s) of one crop: `crop` is (H, W, C) float in [0, 1], `mask` (H, W).

    A boolean mask is one object (ObjectNumber 1); an integer mask gives one row per label.
    Columns are those of `measure_objects`, with the crop's own pixel coordinates.
    """
    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[2] != len(channel_names):
        raise ValueError(f"crop must be (H, W, {len(channel_names)}), got {crop.shape}")
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.int32)
    images = {ch: crop[:, :, i] for i, ch in enumerate(channel_names)}
    return measure_objects(images, {"object": mask}, modules, scale_max=scale_max)["object"]


# ---------------------------------------------------------------------------------------------
# Labels and locations


def _contiguous(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels relabelled 1..N, the original label of each): cp-measure wants 1..N."""
    if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a label image must be integer, got {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise ValueError("a label image must not have negative labels")
    numbers = np.flatnonzero(np.bincount(mask.ravel()))
    numbers = numbers[numbers > 0]
    if numbers.size and numbers[-1] != numbers.size:
        mask = relabel_sequential(mask)[0]
    return mask.astype(np.int32, copy=False), numbers.astype(np.int64)


def _centers(labels: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Location_Center_X/Y: the mean column / row of each label's pixels, as CellProfiler has."""
    rows, cols = np.nonzero(labels)
    idx = labels[rows, cols]
    count = np.bincount(idx, minlength=n + 1)[1:]
    return {"Location_Center_X": np.bincount(idx, cols, minlength=n + 1)[1:] / count,
            "Location_Center_Y": np.bincount(idx, rows, minlength=n + 1)[1:] / count}


# ---------------------------------------------------------------------------------------------
# Modules. Each takes (labels by object set, pixels by channel, channel order, scale_max) and
# returns {object set: {column: values}}.


def _shape(fn: Callable, keep: Callable[[str], bool] = lambda key: True, **params):
    def measure(labels, pixels, channels, scale_max):
        return {name: {f"AreaShape_{key}": v for key, v in fn(lab, None, **params).items()
                       if keep(key)}
                for name, lab in labels.items()}
    return measure


def _per_channel(fn: Callable, rename: Callable[[str, str], str], **params):
    def measure(labels, pixels, channels, scale_max):
        return {name: {rename(key, ch): v
                       for ch in channels for key, v in fn(lab, pixels[ch], **params).items()}
                for name, lab in labels.items()}
    return measure


def _append(key: str, ch: str) -> str:
    """Intensity_MeanIntensity -> Intensity_MeanIntensity_DNA."""
    return f"{key}_{ch}"


def _texture_name(key: str, ch: str) -> str:
    """cp-measure's Contrast_3_00_256 -> Texture_Contrast_DNA_3_00_256."""
    feature, rest = key.split("_", 1)
    return f"Texture_{feature}_{ch}_{rest}"


def _after_feature(key: str, ch: str) -> str:
    """RadialDistribution_FracAtD_1of4 -> RadialDistribution_FracAtD_DNA_1of4."""
    category, feature, rest = key.split("_", 2)
    return f"{category}_{feature}_{ch}_{rest}"


_ADVANCED = ("SpatialMoment_", "CentralMoment_", "NormalizedMoment_", "HuMoment_",
             "InertiaTensor")


def _is_advanced(key: str) -> bool:
    return key.startswith(_ADVANCED)


def _correlation(function: str, names: Callable[[str, str, str], str], **params):
    """A colocalisation measure over each channel pair (a, b), a before b in channel order."""
    def measure(labels, pixels, channels, scale_max):
        # Imported here: it pulls in scipy.stats, a second of start-up for every worker.
        from cp_measure.core import measurecolocalization

        fn = getattr(measurecolocalization, function)
        costes = function == "get_correlation_costes"
        kwargs = dict(params, scale_max=scale_max) if costes else params
        out = {}
        with _fast_costes_correlation(measurecolocalization) if costes else _nothing():
            for name, lab in labels.items():
                out[name] = {}
                for a, b in itertools.combinations(channels, 2):
                    for key, v in fn(pixels_1=pixels[a], pixels_2=pixels[b], masks=lab,
                                     **kwargs).items():
                        out[name][names(key, a, b)] = v
        return out
    return measure


@contextlib.contextmanager
def _nothing():
    yield


@contextlib.contextmanager
def _fast_costes_correlation(module):
    """cp-measure's Costes search with its background correlation computed by `pearson_r`.

    The search calls scipy.stats.pearsonr some twenty times per object and channel pair, and
    scipy's array-API layer makes each call cost ~0.4 ms for a few hundred pixels: Costes was
    70% of re-measuring BBBC013's crops. `pearson_r` is the same arithmetic, in the same order,
    in plain numpy (the values are equal bit for bit: tests/test_measure.py), so the thresholds
    and coefficients are cp-measure's own. Swapped in only while this module measures Costes."""
    original = module._costes_background_correlation

    def background_correlation(fi, si, selected) -> float:
        if np.count_nonzero(selected) < 3:
            return np.nan
        first, second = fi[selected], si[selected]
        if np.ptp(first) == 0 or np.ptp(second) == 0:
            return np.nan
        return pearson_r(first, second)

    module._costes_background_correlation = background_correlation
    try:
        yield
    finally:
        module._costes_background_correlation = original


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """scipy.stats.pearsonr(x, y).statistic for two 1-D float arrays, neither constant: scipy's
    own steps (centre, scale by the largest deviation, norm, dot, clip) without its per-call
    overhead."""
    xm = x - np.mean(x, axis=-1, keepdims=True)
    ym = y - np.mean(y, axis=-1, keepdims=True)
    xmax = np.max(np.abs(xm), axis=-1, keepdims=True)
    ymax = np.max(np.abs(ym), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normxm = xmax * np.linalg.norm(xm / xmax, ord=2, axis=-1, keepdims=True)
        normym = ymax * np.linalg.norm(ym / ymax, ord=2, axis=-1, keepdims=True)
        r = np.vecdot(xm / normxm, ym / normym, axis=-1)
    r = np.clip(r, -1.0, 1.0)
    if x.shape[-1] == 2:
        r = np.round(r)
    return float(r)


def _pair_name(key: str, a: str, b: str) -> str:
    """Correlation_Pearson -> Correlation_Correlation_a_b; X_1 -> X_a_b, X_2 -> X_b_a."""
    if key == "Correlation_Pearson":
        return f"Correlation_Correlation_{a}_{b}"
    if key.endswith("_1"):
        return f"{key[:-2]}_{a}_{b}"
    if key.endswith("_2"):
        return f"{key[:-2]}_{b}_{a}"
    return f"{key}_{a}_{b}"


def _granularity(spectrum: int):
    def measure(labels, pixels, channels, scale_max):
        return granularity({ch: pixels[ch] for ch in channels}, labels, spectrum)
    return measure


def _radial(labels, pixels, channels, scale_max):
    out = {}
    for name, lab in labels.items():
        geometry = _radial_geometry(lab, RADIAL_BINS)
        out[name] = {_after_feature(key, ch): v for ch in channels
                     for key, v in _radial_features(geometry, pixels[ch]).items()}
    return out


_SIZESHAPE = measureobjectsizeshape.get_sizeshape
_MEASURE: dict[str, Callable] = {
    "sizeshape": _shape(_SIZESHAPE, keep=lambda key: not _is_advanced(key),
                        calculate_advanced=False),
    "moments": _shape(_SIZESHAPE, keep=_is_advanced, calculate_advanced=True),
    "zernike": _shape(measureobjectsizeshape.get_zernike),
    "feret": _shape(get_feret),
    "intensity": _per_channel(get_intensity, _append, legacy=True),
    "texture": _per_channel(get_texture, _texture_name,
                            scale=TEXTURE_SCALE, gray_levels=TEXTURE_GRAY_LEVELS),
    "granularity": _granularity(GRANULARITY_SPECTRUM),
    "granularity4": _granularity(4),
    "radial_distribution": _radial,
    "radial_zernikes": _per_channel(measureobjectintensitydistribution.get_radial_zernikes,
                                    _after_feature),
    "correlation": _correlation("get_correlation_pearson", _pair_name),
    "manders": _correlation("get_correlation_manders_fold", _pair_name,
                            thr=CORRELATION_THRESHOLD),
    "overlap": _correlation("get_correlation_overlap", _pair_name, thr=CORRELATION_THRESHOLD),
    "rwc": _correlation("get_correlation_rwc", _pair_name, thr=CORRELATION_THRESHOLD),
    "costes": _correlation("get_correlation_costes", _pair_name),
}


# ---------------------------------------------------------------------------------------------
# Granularity (CellProfiler's MeasureGranularity, as cp-measure computes it), with the spectrum
# of a channel computed once for every object set.


def granularity(images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                spectrum: int = 16, subsample: float = 0.25, background_subsample: float = 0.25,
                element_size: int = 10) -> dict[str, dict[str, np.ndarray]]:
    """{object set: {"Granularity_<k>_<channel>": per-object values}}.

    `images`: channel -> 2-D image; `labels`: object set -> contiguous 1..N label image. Each
    image is subsampled, its background (a large grey opening of a further-subsampled copy)
    subtracted, and then repeatedly eroded and reconstructed; term k is the percentage of each
    object's mean intensity that the k-th step removes.
    """
    stack = {ch: np.asarray(pixels, dtype=np.float64)[None] for ch, pixels in images.items()}
    return granularity_of_crops(stack, [labels], spectrum, subsample, background_subsample,
                                element_size)[0]


def granularity_of_crops(images: dict[str, np.ndarray], labels: list[dict[str, np.ndarray]],
                         spectrum: int = 16, subsample: float = 0.25,
                         background_subsample: float = 0.25, element_size: int = 10
                         ) -> list[dict[str, dict[str, np.ndarray]]]:
    """granularity() of each of n images of one size at once, the same numbers as one at a time.

    `images`: channel -> [n, H, W] float64; `labels[j]`: image j's object sets, as granularity
    takes them. Every step works on the stack, slice by slice (footprints one image deep; the
    interpolation's weight across images is exactly 0), so a remeasured chunk of crops costs a
    few array operations per step instead of a few per crop. Stacks reconstruct by repeated
    geodesic dilation (cheap on crop-sized images), one image by skimage's sort-based
    reconstruction (for a whole field); both give the one reconstruction, by max and min alone.
    """
    n, height, width = next(iter(images.values())).shape
    shape = np.array((height, width))
    small_shape = (shape * subsample).astype(int)
    out = [{name: {} for name in found} for found in labels]
    if (small_shape < 2).any():
        for j, found in enumerate(labels):
            for name, lab in found.items():
                out[j][name] = {f"Granularity_{k}_{ch}": np.full(int(lab.max()), np.nan)
                                for ch in images for k in range(1, spectrum + 1)}
        return out
    means = [{name: _upsampled_mean_operator(lab, small_shape) for name, lab in found.items()}
             for found in labels]
    areas = [{name: np.bincount(lab.ravel())[1:] for name, lab in found.items()}
             for found in labels]
    grid = _stack_grid(n, np.mgrid[0:small_shape[0], 0:small_shape[1]].astype(float) / subsample)
    cross = skimage.morphology.disk(1, dtype=bool)[None]
    reconstruct = _reconstruct_by_dilation if n > 1 else \
        (lambda seed, mask, footprint: skimage.morphology.reconstruction(seed, mask,
                                                                         footprint=footprint))
    for ch, pixels in images.items():
        small = scipy.ndimage.map_coordinates(pixels, grid, order=1)
        small -= _background(small, background_subsample, element_size)
        small[small < 0] = 0
        current = [{name: np.bincount(lab.ravel(), pixels[j].ravel())[1:] / areas[j][name]
                    for name, lab in found.items()} for j, found in enumerate(labels)]
        start = [{name: np.maximum(mean, np.finfo(float).eps) for name, mean in now.items()}
                 for now in current]
        eroded = small.copy()
        for k in range(1, spectrum + 1):
            eroded = skimage.morphology.erosion(eroded, footprint=cross)
            reconstructed = reconstruct(eroded, small, cross)
            for j, found in enumerate(labels):
                for name in found:
                    new = means[j][name](reconstructed[j])
                    out[j][name][f"Granularity_{k}_{ch}"] = \
                        (current[j][name] - new) * 100 / start[j][name]
                    current[j][name] = new
    return out


def _stack_grid(n: int, grid: np.ndarray) -> np.ndarray:
    """map_coordinates' coordinates of a 2-D `grid` [2, h, w] in each of n stacked images."""
    out = np.empty((3, n) + grid.shape[1:])
    out[0] = np.arange(n)[:, None, None]
    out[1:] = grid[:, None]
    return out


def _reconstruct_by_dilation(seed: np.ndarray, mask: np.ndarray, footprint: np.ndarray
                             ) -> np.ndarray:
    """skimage.morphology.reconstruction(seed, mask, footprint=footprint) (by dilation; seed <=
    mask), as the geodesic dilations of the seed under the mask repeated until nothing changes.
    scipy's 'reflect' border only repeats an edge pixel, its own neighbour already."""
    current = seed
    while True:
        grown = np.minimum(scipy.ndimage.grey_dilation(current, footprint=footprint), mask)
        if np.array_equal(grown, current):
            return grown
        current = grown


def _background(small: np.ndarray, subsample: float, element_size: int) -> np.ndarray:
    """The slowly varying background of each image of a stack [n, h, w]: an opening (radius
    `element_size`) at a coarser scale."""
    n, shape = small.shape[0], np.array(small.shape[1:])
    back_shape = shape * subsample
    grid = np.mgrid[0:back_shape[0], 0:back_shape[1]].astype(float)
    back = scipy.ndimage.map_coordinates(small, _stack_grid(n, grid / subsample), order=1)
    disk = skimage.morphology.disk(element_size, dtype=bool)[None]
    back = skimage.morphology.dilation(skimage.morphology.erosion(back, footprint=disk),
                                       footprint=disk)
    grid = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    grid[0] *= (back_shape[0] - 1) / (shape[0] - 1)
    grid[1] *= (back_shape[1] - 1) / (shape[1] - 1)
    return scipy.ndimage.map_coordinates(back, _stack_grid(n, grid), order=1)


def _upsampled_mean_operator(labels: np.ndarray, small_shape: np.ndarray) -> Callable:
    """small image -> per-object mean of its bilinear upsampling to `labels`' shape.

    Linear in the small image, so it is one sparse matrix built once per object set. A pixel
    whose source point falls outside the small grid reads 0 (map_coordinates' constant mode)
    but still counts in the mean.
    """
    shape = labels.shape
    rows, cols = np.nonzero(labels)
    objects = labels[rows, cols] - 1
    n = int(labels.max())
    counts = np.bincount(objects, minlength=n).astype(float)
    r = rows * ((small_shape[0] - 1) / (shape[0] - 1))
    c = cols * ((small_shape[1] - 1) / (shape[1] - 1))
    inside = (r <= small_shape[0] - 1) & (c <= small_shape[1] - 1)
    r, c, objects = r[inside], c[inside], objects[inside]
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = r - r0, c - c0
    r1 = np.minimum(r0 + 1, small_shape[0] - 1)
    c1 = np.minimum(c0 + 1, small_shape[1] - 1)
    width = int(small_shape[1])
    operator = scipy.sparse.csr_matrix(
        (np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]),
         (np.tile(objects, 4),
          np.concatenate([r0 * width + c0, r0 * width + c1, r1 * width + c0, r1 * width + c1]))),
        shape=(n, int(small_shape[0]) * width))
    return lambda small: (operator @ small.ravel()) / counts


# ---------------------------------------------------------------------------------------------
# Radial distribution (CellProfiler's MeasureObjectIntensityDistribution with its defaults:
# scaled bins, each object its own centre, as cp-measure computes it), with an object set's
# geometry computed once for every channel.


def _radial_geometry(labels: np.ndarray, bins: int) -> dict:
    """Each object pixel's bin (normalised distance from the centre) and wedge (of 8).

    CellProfiler (and cp-measure) compute the distance to the edge and the geodesic distance
    from the centre over the whole image, one colour of non-touching objects at a time. Both
    depend only on the object's own pixels (the nearest pixel outside an object is always next
    to it, and a path from the centre never leaves it), so each object is done in its own
    bounding box, padded by one pixel: the same numbers at a fraction of the cost.
    """
    n = int(labels.max())
    parts = {key: [] for key in ("index", "object", "to_edge", "from_centre", "di", "dj")}
    for k, box in enumerate(scipy.ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        inside = labels[box] == k
        to_edge = scipy.ndimage.distance_transform_edt(inside)
        # The centre is the point farthest from the edge; ties go to the first in C order.
        ci, cj = np.unravel_index(np.argmax(np.where(inside, to_edge, -1.0)), inside.shape)
        seed = np.zeros(inside.shape, int)
        seed[ci, cj] = 1
        owner, from_centre = centrosome.propagate.propagate(np.zeros(inside.shape), seed,
                                                           inside, 1)
        i, j = np.nonzero(owner > 0)
        parts["index"].append(np.ravel_multi_index((i + box[0].start, j + box[1].start),
                                                   labels.shape))
        parts["object"].append(np.full(i.size, k - 1))
        parts["to_edge"].append(to_edge[i, j])
        parts["from_centre"].append(from_centre[i, j])
        parts["di"].append(i - ci)
        parts["dj"].append(j - cj)
    g = {key: np.concatenate(v) if v else np.zeros(0, int) for key, v in parts.items()}
    # Pixels in C order, as the whole-image computation visits them (sums then agree bitwise).
    order = np.argsort(g["index"], kind="stable")
    g = {key: v[order] for key, v in g.items()}
    d = g["from_centre"]
    normalised = d / (d + g["to_edge"] + 0.001)
    bin_index = np.minimum((normalised * bins).astype(int), bins)
    di, dj = g["di"], g["dj"]
    wedge = (di > 0).astype(int) + 2 * (dj > 0) + 4 * (np.abs(di) > np.abs(dj))
    return {"n": n, "bins": bins, "index": g["index"], "object": g["object"],
            "bin": bin_index, "wedge": wedge}


def _radial_features(geometry: dict, pixels: np.ndarray) -> dict[str, np.ndarray]:
    n, bins = geometry["n"], geometry["bins"]
    obj, bin_index, wedge = geometry["object"], geometry["bin"], geometry["wedge"]
    values = pixels.ravel()[geometry["index"]]
    cell = obj * (bins + 1) + bin_index
    size = n * (bins + 1)
    intensity = np.bincount(cell, values, minlength=size).reshape(n, bins + 1)
    area = np.bincount(cell, minlength=size).reshape(n, bins + 1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_at_d = intensity / intensity.sum(1, keepdims=True)
        mean_frac = frac_at_d / (area / area.sum(1, keepdims=True) + np.finfo(float).eps)
    out = {}
    for b in range(bins):
        in_bin = bin_index == b
        slot = obj[in_bin] * 8 + wedge[in_bin]
        wedge_sum = np.bincount(slot, values[in_bin], minlength=n * 8).reshape(n, 8)
        wedge_area = np.bincount(slot, minlength=n * 8).reshape(n, 8)
        with np.errstate(divide="ignore", invalid="ignore"):
            wedge_mean = np.ma.MaskedArray(wedge_sum / wedge_area, wedge_area == 0)
            cv = np.asarray(np.ma.filled(np.std(wedge_mean, 1) / np.mean(wedge_mean, 1),
                                         np.nan), dtype=float)
        cv[(wedge_area > 0).sum(1) == 0] = 0
        scale = f"{b + 1}of{bins}"
        out[f"RadialDistribution_FracAtD_{scale}"] = frac_at_d[:, b]
        out[f"RadialDistribution_MeanFrac_{scale}"] = mean_frac[:, b]
        out[f"RadialDistribution_RadialCV_{scale}"] = cv
    return out


def texture_scale(module: str) -> int | None:
    """The scale of a "texture:<scale>" module name (Haralick features at another distance than
    TEXTURE_SCALE, as a pipeline's MeasureTexture may set), else None."""
    prefix, _, scale = module.partition(":")
    return int(scale) if prefix == "texture" and scale.isdigit() and int(scale) > 0 else None


def _measurer(module: str) -> Callable:
    if module in _MEASURE:
        return _MEASURE[module]
    return _per_channel(get_texture, _texture_name, scale=texture_scale(module),
                        gray_levels=TEXTURE_GRAY_LEVELS)
