"""Profiles to draw from: CellProfiler tables or ExportToSpreadsheet folders matched to the
model's features by name, a dataset's treatment means and single cells, and readable labels."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools.cellprofiler import load_cellprofiler_cells, read_table
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import compartment_of
from tfrecords_tools.manifest import matching_manifest
from tfrecords_tools.reader import iter_cells

LABEL_COLUMNS = ("Metadata_Treatment", "Metadata_pert_iname", "Metadata_Compound",
                 "Metadata_Condition")


def object_prefixes(feature_names) -> list[str]:
    return sorted({compartment_of(name) for name in feature_names})


def read_profiles(path, feature_names, object_name: str | None = None,
                  missing: str = "error") -> tuple[pd.DataFrame, pd.DataFrame]:
    """A CSV/Parquet of CellProfiler rows, or an ExportToSpreadsheet folder (its object tables
    joined per cell) -> (raw values [N, F] by feature name, the other columns).

    Columns are matched by name; extra columns are kept aside. A table of one object set
    (CellProfiler's Nuclei.csv: `AreaShape_Area`) is matched with its object's prefix
    (`Nuclei_AreaShape_Area`), taken from `object_name` or the file name. Features the table
    lacks are an error that lists them, or with missing="median" the training medians.
    """
    path = Path(path)
    if path.is_dir():
        table = read_cellprofiler_folder(path, feature_names)
    elif path.is_file():
        table = read_table(path)
    else:
        raise UserInputError(f"{path}: no such file or folder (PROFILES is a CSV or Parquet table "
                             "of CellProfiler measurements, one row per cell, or a CellProfiler "
                             "ExportToSpreadsheet folder).")
    if table.empty:
        raise UserInputError(f"{path}: the table has no rows.")
    prefixes = object_prefixes(feature_names)
    stem = re.sub(r"^MyExpt_", "", path.stem)
    object_name = object_name or (stem if stem in prefixes else None)
    if object_name is not None and object_name not in prefixes:
        raise UserInputError(f"--object {object_name}: the model's features come from "
                             f"{', '.join(prefixes)}.")
    columns = {}
    for name in feature_names:
        if name in table.columns:
            columns[name] = name
        elif object_name and name.startswith(f"{object_name}_") \
                and name[len(object_name) + 1:] in table.columns:
            columns[name] = name[len(object_name) + 1:]
    absent = [name for name in feature_names if name not in columns]
    if absent and missing != "median":
        shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
        from_objects = sorted({compartment_of(a) for a in absent})
        raise UserInputError(
            f"{path}: {len(absent)} of the model's {len(feature_names)} features are not columns "
            f"of the table: {shown} (objects {', '.join(from_objects)}). Give a table with one "
            "row per cell and <Object>_<Feature> columns for every object set (as pycytominer "
            "writes), or --missing median to draw them at the training medians.")
    values = pd.DataFrame(index=table.index, columns=feature_names, dtype=np.float32)
    for name, column in columns.items():
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & table[column].notna()
        if bad.any():
            raise UserInputError(f"{path}: column {column} holds non-numeric values "
                                 f"(e.g. {table[column][bad].iloc[0]!r} in row {bad.idxmax() + 2}).")
        values[name] = numbers.astype(np.float32)
    if absent:
        warnings.warn(f"{path}: {len(absent)} feature(s) not in the table are drawn at the "
                      f"training medians: {', '.join(absent[:5])}"
                      f"{' ...' if len(absent) > 5 else ''}", UserWarning, stacklevel=2)
    extra = table[[c for c in table.columns if c not in set(columns.values())]]
    return values.reset_index(drop=True), extra.reset_index(drop=True)


def read_cellprofiler_folder(folder: Path, feature_names) -> pd.DataFrame:
    """An ExportToSpreadsheet folder's object tables joined into one row per cell, columns
    <Object>_<Feature> for the model's object sets (the first one's rows are the cells), with
    the Image table's Metadata columns, as convert joins them."""
    objects = list(dict.fromkeys(compartment_of(name) for name in feature_names))
    cells, _, _ = load_cellprofiler_cells(folder, objects, channels=[])
    return cells.drop(columns=[c for c in cells.columns if c.startswith("_")])


def row_labels(extra: pd.DataFrame, label_column: str | None = None) -> list[str]:
    """A readable label per profile: --label-column, else treatment and image-object numbers."""
    if label_column is not None:
        if label_column not in extra.columns:
            raise UserInputError(f"--label-column {label_column}: not a column of PROFILES "
                                 f"(columns: {', '.join(map(str, extra.columns[:10]))}...).")
        return [str(v) for v in extra[label_column]]
    parts = []
    treatment = next((c for c in LABEL_COLUMNS if c in extra.columns), None)
    if treatment:
        parts.append(extra[treatment].astype(str))
    if {"ImageNumber", "ObjectNumber"} <= set(extra.columns):
        parts.append(extra["ImageNumber"].astype(str) + "-" + extra["ObjectNumber"].astype(str))
    if not parts:
        return [f"row {i + 1}" for i in range(len(extra))]
    labels = parts[0]
    for part in parts[1:]:
        labels = labels + " " + part
    return list(labels)


def warn_nonfinite(values: np.ndarray, feature_names, what: str) -> None:
    """Warn, naming the features, about NaN/inf values (the model imputes training medians)."""
    bad = ~np.isfinite(values)
    if bad.any():
        counts = bad.sum(0)
        named = [f"{feature_names[j]} ({counts[j]})" for j in np.argsort(-counts)[:5] if counts[j]]
        n_feat = int((counts > 0).sum())
        warnings.warn(f"{what}: {int(bad.sum())} missing or infinite value(s) in {n_feat} "
                      f"feature(s), drawn at the training medians: {', '.join(named)}"
                      f"{' ...' if n_feat > 5 else ''}", UserWarning, stacklevel=3)


FAR_BEYOND = 5.0  # training SDs past the training range's min or max that a warning names


def training_range(*manifests):
    """(low, high) per feature: the training split's min and max from the first manifest that
    has them (convert writes them), or None."""
    for manifest in manifests:
        stats = ((manifest or {}).get("features") or {}).get("stats") or {}
        if "min" in stats and "max" in stats:
            return (np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64))
    return None


def warn_far_beyond(values: np.ndarray, model, what: str) -> None:
    """Warn, naming the features, about values more than FAR_BEYOND training SDs past the
    training range (the model never saw such a cell; what it draws there means little).
    Without a range in the model's manifest, past FAR_BEYOND SDs from the training median."""
    values = np.asarray(values, np.float64).reshape(-1, len(model.feature_names))
    sd = np.where(np.asarray(model.sd) > 0, model.sd, np.inf).astype(np.float64)
    bounds = training_range(getattr(model, "manifest", None))
    low, high = bounds if bounds is not None else (model.median, model.median)
    low = np.where(np.isfinite(low), low, model.median)
    high = np.where(np.isfinite(high), high, model.median)
    with np.errstate(invalid="ignore"):
        far = np.isfinite(values) & ((values < low - FAR_BEYOND * sd)
                                     | (values > high + FAR_BEYOND * sd))
    if not far.any():
        return
    counts = far.sum(0)
    named = []
    for j in np.argsort(-counts, kind="stable")[:5]:
        if counts[j]:
            worst = values[far[:, j], j][np.argmax(np.abs(values[far[:, j], j]))]
            seen = (f"{low[j]:.4g} to {high[j]:.4g}" if bounds is not None
                    else f"median {model.median[j]:.4g}, SD {model.sd[j]:.4g}")
            named.append(f"{model.feature_names[j]} ({counts[j]} value(s), e.g. {worst:.4g} "
                         f"against {seen})")
    n_feat = int((counts > 0).sum())
    where = "training range" if bounds is not None else "training median"
    warnings.warn(f"{what}: {int(far.sum())} value(s) in {n_feat} feature(s) lie more than "
                  f"{FAR_BEYOND:g} training SDs beyond the {where}, where the model never saw a "
                  f"cell; its pictures of them mean little: {'; '.join(named)}"
                  f"{' ...' if n_feat > 5 else ''}", UserWarning, stacklevel=3)


def model_dataset(data, model, needed_for: str) -> dict:
    """The manifest of DATA_DIR, the dataset `model` was trained on; a clear error without one."""
    if data is None:
        raise UserInputError(f"--data DATA_DIR is needed {needed_for}.")
    return matching_manifest(data, model.feature_names)


def treatment_means(data, model, treatments, max_cells: int = 20000) -> pd.DataFrame:
    """Each treatment's mean raw profile (NaN ignored) over up to max_cells cells of DATA_DIR."""
    manifest = model_dataset(data, model, "for treatment means")
    known = manifest["treatments"]["names"]
    if list(treatments) == ["all"]:
        treatments = known
    unknown = [t for t in treatments if t not in known]
    if unknown:
        raise UserInputError(f"treatment(s) {', '.join(unknown)} not in {data}; it has "
                             f"{', '.join(known)}.")
    rows = {}
    for treatment in treatments:
        feats = []
        for _, values in iter_cells(data, manifest, treatment=treatment):
            feats.append(values)
            if len(feats) >= max_cells:
                break
        if not feats:
            raise UserInputError(f"{data}: no cells of treatment {treatment}.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            rows[treatment] = np.nanmean(np.stack(feats), axis=0)
    return pd.DataFrame.from_dict(rows, orient="index", columns=model.feature_names)


def cell_profile(data, model, cell_id: str) -> np.ndarray:
    """The raw profile of one cell of DATA_DIR by its id (<ImageNumber>-<ObjectNumber>)."""
    manifest = model_dataset(data, model, f"to find cell {cell_id}")
    for found, values in iter_cells(data, manifest):
        if found == cell_id:
            return values.copy()
    raise UserInputError(f"cell {cell_id}: not in {data} (cell ids are <ImageNumber>-<ObjectNumber>, "
                         "as `cp2image-tf inspect DATA_DIR` shows).")
