"""Feature names, choosing the feature columns of a single-cell table, and their statistics.

Feature names follow the field's `<Compartment>_<Module>_<Feature>` convention
(e.g. `Nuclei_AreaShape_Area`, `Cells_Intensity_MeanIntensity_DNA`); `feature_name` and
`object_and_measurement` are the one place that reads them. By default
every numeric measurement is a feature except identifiers and positions, which
say where a cell is, not what it looks like.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

# Matched against the name without its compartment prefix.
NOT_FEATURES = [
    (r"^Metadata_", "metadata"),
    (r"^(ImageNumber|ObjectNumber|Number_Object_Number|TableNumber)$", "identifier"),
    (r"ObjectNumber", "identifier"),
    (r"^Location_", "position in the field"),
    (r"^AreaShape_Center_", "position in the field"),
    (r"^AreaShape_BoundingBox(Minimum|Maximum)_", "position in the field"),
    (r"^Parent_", "parent object number"),
    (r"^Children_.*_Count$", "child object count"),
    (r"^(FileName|PathName|URL|Series|Frame)_", "file reference"),
]


# CellProfiler's measurement categories: the first part of a measurement's name.
CATEGORIES = ("AreaShape", "Intensity", "Texture", "Granularity", "RadialDistribution",
              "Correlation", "Location", "Number", "Parent", "Children", "Neighbors",
              "ObjectSkeleton", "Math", "Count", "Metadata", "Threshold")


@dataclass(frozen=True)
class FeatureName:
    """`Nuclei_AreaShape_Zernike_0_0` -> compartment Nuclei, module AreaShape, measurement
    Zernike_0_0; a part the name lacks is None (no "_": no compartment; one "_": no
    measurement)."""
    name: str
    compartment: str | None
    module: str | None
    measurement: str | None


def feature_name(name: str) -> FeatureName:
    parts = name.split("_", 2)
    if len(parts) == 1:
        return FeatureName(name, None, None, None)
    return FeatureName(name, parts[0], parts[1], parts[2] if len(parts) > 2 else None)


def compartment_of(name: str) -> str:
    """The object set a feature belongs to: the part before the first "_" (the whole name
    without one)."""
    return name.split("_", 1)[0]


def object_and_measurement(name: str, categories=CATEGORIES) -> tuple[str | None, str]:
    """("Nuclei", "AreaShape_Area") from "Nuclei_AreaShape_Area"; the object may hold "_"
    (it ends where a measurement category starts); (None, name) when there is no object."""
    parts = name.split("_")
    for i in range(1, len(parts)):
        if parts[i] in categories:
            return "_".join(parts[:i]), "_".join(parts[i:])
    if len(parts) < 2 or parts[0] in categories:
        return None, name
    return parts[0], "_".join(parts[1:])


@dataclass
class FeatureSelection:
    names: list[str]
    dropped: list[dict] = field(default_factory=list)  # {"name", "reason"}


def strip_compartment(name: str, compartments) -> str:
    for comp in compartments:
        if name.startswith(comp + "_"):
            return name[len(comp) + 1:]
    return name


def select_features(table: pd.DataFrame, compartments, include=None, exclude=None,
                    features_file=None, source="the object table") -> FeatureSelection:
    """Feature columns of `table` in order; excluded columns are listed with why.

    `include` / `exclude` are regular expressions searched in the full name;
    `features_file` is a text file with one feature name per line, which then
    gives the features and their order.
    """
    dropped = []
    if features_file is not None:
        wanted = [line.strip() for line in open(features_file) if line.strip()
                  and not line.startswith("#")]
        missing = [n for n in wanted if n not in table.columns]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserInputError(
                f"{features_file}: {len(missing)} feature(s) not in {source}: {shown}. "
                "Names are <Object>_<Module>_<Feature>, e.g. Nuclei_AreaShape_Area.")
        candidates = wanted
    else:
        candidates = []
        for name in table.columns:
            bare = strip_compartment(name, compartments)
            reason = next((why for pattern, why in NOT_FEATURES if re.search(pattern, bare)), None)
            if reason is None and name.startswith("Metadata_"):
                reason = "metadata"
            if reason is not None:
                continue  # not a measurement: never a feature, not worth listing
            if not pd.api.types.is_numeric_dtype(table[name]) and not _all_missing(table[name]):
                bad = table[name][pd.to_numeric(table[name], errors="coerce").isna()
                                  & table[name].notna()]
                if len(bad):
                    raise UserInputError(
                        f"{source}: column {name} is not numeric (e.g. value {bad.iloc[0]!r}). "
                        f"Fix the value or leave the column out with --exclude '^{re.escape(name)}$'.")
            candidates.append(name)
        # Merged batches list the same columns in other orders: fix one order.
        rank = {comp: i for i, comp in enumerate(compartments)}
        candidates.sort(key=lambda n: (rank.get(compartment_of(n), len(rank)), n))
    for pattern, keep in ((include, True), (exclude, False)):
        if pattern is None:
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            option = "--include" if keep else "--exclude"
            raise UserInputError(f"{option} {pattern!r}: not a valid regular expression ({err}).") from None
        kept = []
        for name in candidates:
            if bool(regex.search(name)) == keep:
                kept.append(name)
            else:
                dropped.append({"name": name, "reason": "not matched by --include" if keep
                                else "matched by --exclude"})
        candidates = kept
    if not candidates:
        raise UserInputError(
            f"{source}: no feature columns left to use. Check --include/--exclude/"
            "--features-file against the column names of the object tables.")
    return FeatureSelection(names=candidates, dropped=dropped)


def _all_missing(series: pd.Series) -> bool:
    return bool(series.isna().all())


def as_float_matrix(table: pd.DataFrame, names) -> np.ndarray:
    """The feature columns as float32 [cells, features]; text values already vetted."""
    block = table[names]
    text = [n for n in names if not pd.api.types.is_numeric_dtype(block[n])]
    if text:
        block = block.assign(**{n: pd.to_numeric(block[n], errors="coerce") for n in text})
    return block.to_numpy(dtype=np.float32)


def drop_uninformative(values: np.ndarray, names, train_rows) -> tuple[list[int], list[dict]]:
    """Indices of features to keep; features all-NaN or constant on the training split go."""
    train = values[train_rows]
    keep, dropped = [], []
    for j, name in enumerate(names):
        column = train[:, j]
        finite = column[np.isfinite(column)]
        if finite.size == 0:
            dropped.append({"name": name, "reason": "no finite value in the training split"})
        elif np.all(finite == finite[0]):
            dropped.append({"name": name, "reason": f"constant ({finite[0]:g}) in the training split"})
        else:
            keep.append(j)
    return keep, dropped


def feature_statistics(values: np.ndarray) -> dict:
    """Per-feature mean, std, median, MAD, min and max over finite values (float64 arithmetic).

    MAD is the raw median absolute deviation (multiply by 1.4826 for a robust SD); min and max
    are the training range that traversals stay within.
    """
    values = np.asarray(values, dtype=np.float64)
    masked = np.where(np.isfinite(values), values, np.nan)
    median = np.nanmedian(masked, axis=0)
    stats = {
        "mean": np.nanmean(masked, axis=0),
        "std": np.nanstd(masked, axis=0),
        "median": median,
        "mad": np.nanmedian(np.abs(masked - median), axis=0),
        "finite_count": np.isfinite(values).sum(axis=0),
        "min": np.nanmin(masked, axis=0),
        "max": np.nanmax(masked, axis=0),
    }
    return {k: [float(x) for x in v] for k, v in stats.items()}


# ---------------------------------------------------------------------------
# Statistics merged from parts: what convert's parts write and its final step gathers.
#
# Moments: each part keeps (finite count, mean, M2) per feature; parts are merged with Chan et
# al.'s pairwise formula in the fixed order of the parts, so every way of running a job (one
# process, a process pool, Dask, --part/--finalize) gives bit-identical values; they equal
# numpy's nanmean/nanstd over all values to rounding (about 1e-15 relative).
# Median, MAD, min and max: exact. Each part keeps its training values sorted per feature,
# feature-major ([features, cells]: a block of features is one contiguous run of the file); the
# final step reads one block of features of every part at a time, those bytes only, into one
# float32 buffer of at most `memory_bytes` (at least one feature: 4 bytes x training cells),
# and takes the median of each feature's finite values (as float64), then the median of their
# absolute deviation from it: the very numbers feature_statistics gives. Memory is that buffer
# plus a few float64 copies of one feature's column, whatever the screen's size up to where one
# feature's column outgrows the buffer; docs/results/2026-12-06-convert-speed.md measures it.


def part_moments(values: np.ndarray) -> dict:
    """{"count", "mean", "m2"} per feature over the finite values of one part (float64)."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    mean = np.divide(safe.sum(axis=0), count, out=np.zeros(values.shape[1]), where=count > 0)
    m2 = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    return {"count": [int(c) for c in count], "mean": [float(x) for x in mean],
            "m2": [float(x) for x in m2]}


def merge_moments(parts: list[dict]) -> dict:
    """Chan's merge of part_moments results, in the order given: {"count", "mean", "std"}."""
    count = mean = m2 = None
    for part in parts:
        n_b = np.asarray(part["count"], dtype=np.float64)
        mean_b = np.asarray(part["mean"], dtype=np.float64)
        m2_b = np.asarray(part["m2"], dtype=np.float64)
        if count is None:
            count, mean, m2 = n_b.copy(), mean_b.copy(), m2_b.copy()
            continue
        n = count + n_b
        delta = mean_b - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(n > 0, n_b / n, 0.0)
            mean = np.where(n_b > 0, mean + delta * share, mean)
            m2 = np.where(n_b > 0, m2 + m2_b + delta * delta * count * share, m2)
        count = n
    if count is None:
        raise ValueError("no part to merge")
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(count > 0, np.sqrt(m2 / np.maximum(count, 1)), np.nan)
    mean = np.where(count > 0, mean, np.nan)
    return {"count": count, "mean": mean, "std": std}


def sorted_part_values(values: np.ndarray) -> np.ndarray:
    """A part's values [cells, features] as float32 [features, cells], each feature's values
    sorted (non-finite last)."""
    values = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
    values = np.where(np.isfinite(values), values, np.float32(np.nan))
    return np.ascontiguousarray(np.sort(values, axis=0).T)


class _SortedValues:
    """Features lo:hi of one part's sorted_part_values (an array, or a .npy file whose header is
    read once), as float32 [hi - lo, cells]; from a file, only those bytes are read."""

    def __init__(self, part):
        self.part = part
        if isinstance(part, np.ndarray):
            self.cells = part.shape[1]
            return
        with open(part, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{part}: not a [features, cells] C-order array")
        self.dtype, self.cells = np.dtype(dtype), shape[1]

    def rows(self, lo: int, hi: int) -> np.ndarray:
        if isinstance(self.part, np.ndarray):
            return self.part[lo:hi]
        return np.fromfile(self.part, dtype=self.dtype, count=(hi - lo) * self.cells,
                           offset=self.offset + lo * self.cells * self.dtype.itemsize
                           ).reshape(hi - lo, self.cells)


def merged_quantiles(arrays: list, n_features: int, memory_bytes: int = 1 << 25) -> dict:
    """Exact median, MAD, min and max per feature from parts' sorted_part_values (arrays or .npy
    paths), one block of features at a time in at most `memory_bytes` (see the notes above)."""
    parts = [_SortedValues(a) for a in arrays]
    rows = sum(p.cells for p in parts)
    block = max(1, min(n_features, int(memory_bytes // max(1, rows * 4))))
    median = np.full(n_features, np.nan)
    mad = np.full(n_features, np.nan)
    low, high = np.full(n_features, np.nan), np.full(n_features, np.nan)
    buffer = np.empty((block, rows), dtype=np.float32)  # one block's values, reused
    for lo in range(0, n_features, block):
        hi = min(n_features, lo + block)
        at = 0
        for part in parts:
            buffer[:hi - lo, at:at + part.cells] = part.rows(lo, hi)
            at += part.cells
        for j in range(hi - lo):
            column = buffer[j]
            finite = column[np.isfinite(column)].astype(np.float64)
            if finite.size:
                median[lo + j] = np.median(finite)
                mad[lo + j] = np.median(np.abs(finite - median[lo + j]))
                low[lo + j], high[lo + j] = finite.min(), finite.max()
    return {"median": median, "mad": mad, "min": low, "max": high}


def statistics_from_parts(moments: list[dict], value_arrays: list, n_features: int,
                          memory_bytes: int = 1 << 25) -> dict:
    """feature_statistics' dict, gathered from parts (see the notes above)."""
    merged = merge_moments(moments)
    quantiles = merged_quantiles(value_arrays, n_features, memory_bytes)
    stats = {"mean": merged["mean"], "std": merged["std"], "median": quantiles["median"],
             "mad": quantiles["mad"], "finite_count": merged["count"],
             "min": quantiles["min"], "max": quantiles["max"]}
    return {k: [int(x) if k == "finite_count" else float(x) for x in v]
            for k, v in stats.items()}
