"""Choosing the feature columns of a single-cell table, and their statistics.

Feature names follow the field's `<Compartment>_<Module>_<Feature>` convention
(e.g. `Nuclei_AreaShape_Area`, `Cells_Intensity_MeanIntensity_DNA`). By default
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
        candidates.sort(key=lambda n: (rank.get(n.split("_")[0], len(rank)), n))
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
    """Per-feature mean, std, median and MAD over finite values (float64 arithmetic).

    MAD is the raw median absolute deviation (multiply by 1.4826 for a robust SD).
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
    }
    return {k: [float(x) for x in v] for k, v in stats.items()}
