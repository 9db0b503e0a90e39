"""Reading CellProfiler's ExportToSpreadsheet tables (and single-cell tables) into one row per
cell, and the images they name. The loaders take plain arguments, for convert and for
anyone reading profiles.

An ExportToSpreadsheet folder holds `Image.csv` (one row per image set, with
`FileName_<image>` / `PathName_<image>` columns) and one CSV per object set
(`Nuclei.csv`, `Cells.csv`, ...). CellProfiler's default file-name prefix
(`MyExpt_Image.csv`) is accepted too. PathName values may be absolute or
relative; relative ones are taken relative to the folder holding Image.csv.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import compartment_of

CROP_COLUMN_CANDIDATES = ("Metadata_CropFile", "Metadata_Crop", "CropFile")

IMAGE_TABLE = "Image"


def find_table(folder: Path, name: str) -> Path:
    """The CSV (or Parquet) for an object set or the Image table, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such folder. Point INPUT at the folder "
                             "CellProfiler's ExportToSpreadsheet wrote (with Image.csv).")
    candidates = []
    for ext in ("csv", "parquet"):
        exact = folder / f"{name}.{ext}"
        if exact.is_file():
            return exact
        candidates += glob.glob(str(folder / f"*_{glob.escape(name)}.{ext}"))
    if len(candidates) == 1:
        return Path(candidates[0])
    if len(candidates) > 1:
        raise UserInputError(
            f"{folder}: several tables match '{name}' ({', '.join(sorted(map(os.path.basename, candidates)))}); "
            "keep one per object set in the folder.")
    if name == IMAGE_TABLE:
        raise UserInputError(f"{folder}: no Image.csv. Export the Image table with "
                             "ExportToSpreadsheet, or use --table for a single-cell table.")
    available = sorted(object_tables(folder))
    raise UserInputError(
        f"{folder}: no table for object '{name}' ({name}.csv). "
        f"Object tables found: {', '.join(available) or 'none'}; choose one with --objects.")


def object_tables(folder: Path) -> list[str]:
    """Names of the object sets whose tables are in an ExportToSpreadsheet folder."""
    names = []
    for path in sorted(Path(folder).glob("*.csv")) + sorted(Path(folder).glob("*.parquet")):
        stem = path.stem
        if stem.endswith(IMAGE_TABLE) or stem.lower().startswith(("experiment", "load_data")):
            continue
        names.append(stem.split("_")[-1] if "_" in stem else stem)
    return names


def read_table(path: Path, columns=None) -> pd.DataFrame:
    """A CSV or Parquet table, with a clear error if it cannot be parsed."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path, columns=columns)
        return pd.read_csv(path, usecols=columns, low_memory=False)
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise UserInputError(f"{path}: cannot be read as a table ({err}).") from None


# What to do about an image file that does not read (truncated copy, damaged disk).
DAMAGED_IMAGE = ("The file is damaged or cut short: copy it again from the microscope's output, "
                 "or remove its image set's row from Image.csv.")


def require_columns(df: pd.DataFrame, columns, path, what: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserInputError(f"{path}: missing column(s) {', '.join(missing)}{what}.")


def require_numeric(df: pd.DataFrame, columns, path) -> None:
    """The key columns (numbers, positions) must hold numbers: the first other value is named
    with its row (as a spreadsheet counts them, the header being row 1)."""
    for column in columns:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() & df[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserInputError(f"{path}: column {column} holds the non-numeric value "
                                 f"{df[column].iloc[row]!r} (row {row + 2}); fix or remove that "
                                 "row, or export the table from CellProfiler again.")
        if df[column].dtype == object:
            df[column] = values


def require_rows(df: pd.DataFrame, path, what: str) -> None:
    if len(df) == 0:
        raise UserInputError(f"{path}: has a header but no rows, so no {what}. Export it from "
                             "CellProfiler again, or check that the pipeline found objects.")


def image_channels(image_df: pd.DataFrame) -> list[str]:
    """Names of the images listed in Image.csv (from FileName_<name> columns)."""
    return [c[len("FileName_"):] for c in image_df.columns if c.startswith("FileName_")]


def channel_paths(image_df: pd.DataFrame, channel: str, image_csv: Path) -> list[str]:
    """Absolute file paths of one channel's images, one per row of Image.csv."""
    fcol, pcol = f"FileName_{channel}", f"PathName_{channel}"
    if fcol not in image_df.columns or pcol not in image_df.columns:
        known = ", ".join(image_channels(image_df)) or "none"
        raise UserInputError(
            f"{image_csv}: no {fcol} / {pcol} columns for channel '{channel}'. "
            f"Images listed there: {known}; fix --channels.")
    base = Path(image_csv).resolve().parent
    paths = []
    for name, folder in zip(image_df[fcol], image_df[pcol]):
        if pd.isna(name) or pd.isna(folder):
            paths.append(None)
            continue
        folder = Path(str(folder))
        if not folder.is_absolute():
            folder = base / folder
        paths.append(os.path.normpath(str(folder / str(name))))
    return paths


def image_header(path: str) -> tuple[tuple, str]:
    """((Y, X), dtype name) of an image from its header, without decoding pixels."""
    import tifffile

    if path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
        return tuple(array.shape[-2:]), str(array.dtype)
    header = _plain_tiff_header(path)
    if header is not None:
        return header
    try:
        with tifffile.TiffFile(path) as tif:
            shape, dtype = tif.series[0].shape, tif.series[0].dtype
    except FileNotFoundError:
        raise UserInputError(f"{path}: image file not found.") from None
    except Exception as err:
        raise UserInputError(f"{path}: cannot be read as an image ({err}). {DAMAGED_IMAGE}") from None
    shape = tuple(s for s in shape if s != 1) if len(shape) > 2 else tuple(shape)
    return shape, str(np.dtype(dtype))


def _plain_tiff_header(path: str):
    """((Y, X), dtype name) of a classic TIFF holding one single-sample page, read from its one IFD (a few
    hundred bytes; tifffile's full parse costs ten times more and convert reads a header per
    channel of every field); None for anything else, which tifffile then reads."""
    import struct

    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8 or head[:2] not in (b"II", b"MM"):
                return None
            order = "<" if head[:2] == b"II" else ">"
            if struct.unpack(order + "H", head[2:4])[0] != 42:
                return None  # BigTIFF or not a TIFF
            handle.seek(struct.unpack(order + "I", head[4:8])[0])
            count_bytes = handle.read(2)
            if len(count_bytes) < 2:
                return None
            count = struct.unpack(order + "H", count_bytes)[0]
            entries = handle.read(12 * count + 4)
    except OSError:
        return None
    if len(entries) < 12 * count + 4 or struct.unpack(order + "I", entries[-4:])[0] != 0:
        return None  # cut short, or more than one page
    tags = {}
    for k in range(count):
        tag, kind, n = struct.unpack(order + "HHI", entries[12 * k:12 * k + 8])
        if n == 1 and kind in (3, 4):
            value = entries[12 * k + 8:12 * k + 12]
            tags[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    if 256 not in tags or 257 not in tags or tags.get(277, 1) != 1:
        return None
    # BitsPerSample (258) and SampleFormat (339: 1 unsigned, 2 signed, 3 float), TIFF's defaults.
    kind = {1: "uint", 2: "int", 3: "float"}.get(tags.get(339, 1))
    bits = tags.get(258, 1)
    if kind is None or bits not in (8, 16, 32, 64) or (kind == "float" and bits < 32):
        return None
    return (tags[257], tags[256]), f"{kind}{bits}"


def load_cellprofiler_cells(folder, objects, channels):
    """Cells of an ExportToSpreadsheet folder, one row each: the object tables joined on
    ImageNumber and ObjectNumber (features prefixed by object; `_has_<object>` says whether a
    later object had the cell), the first object's centre as `_x`/`_y`, the Image table's
    Metadata_ columns (`_has_image`), `path_<channel>` per channel and `_cell_id`.
    Returns (cells, the tables read, Image.csv's path)."""
    folder = Path(folder)
    image_csv = find_table(folder, IMAGE_TABLE)
    image_df = read_table(image_csv)
    require_columns(image_df, ["ImageNumber"], image_csv)
    require_rows(image_df, image_csv, "image sets")
    require_numeric(image_df, ["ImageNumber"], image_csv)
    if image_df["ImageNumber"].duplicated().any():
        dup = image_df["ImageNumber"][image_df["ImageNumber"].duplicated()].iloc[0]
        raise UserInputError(f"{image_csv}: ImageNumber {dup} appears twice; merge batches "
                             "with distinct ImageNumbers.")
    paths = {ch: channel_paths(image_df, ch, image_csv) for ch in channels}
    fields = pd.DataFrame({"ImageNumber": image_df["ImageNumber"].to_numpy()})
    for ch in channels:
        fields[f"path_{ch}"] = paths[ch]
    meta_cols = [c for c in image_df.columns if c.startswith("Metadata_")]
    source_files = [image_csv]
    cells = None
    for k, obj in enumerate(objects):
        path = find_table(folder, obj)
        source_files.append(path)
        table = read_table(path)
        need = ["ImageNumber", "ObjectNumber"] + (
            ["Location_Center_X", "Location_Center_Y"] if k == 0 else [])
        require_columns(table, need, path, " (needed to place crops)" if k == 0 else "")
        require_rows(table, path, f"{obj} objects to convert")
        require_numeric(table, need, path)
        table = table.drop(columns=[c for c in table.columns if c.startswith("Metadata_")])
        renamed = {c: f"{obj}_{c}" for c in table.columns if c not in ("ImageNumber", "ObjectNumber")}
        table = table.rename(columns=renamed).copy()  # consolidated: merges stay cheap
        if cells is None:
            cells = table
        else:
            cells = cells.merge(table, on=["ImageNumber", "ObjectNumber"], how="left",
                                indicator=f"_has_{obj}")
    cells = cells.copy().rename(columns={f"{objects[0]}_Location_Center_X": "_x",
                                  f"{objects[0]}_Location_Center_Y": "_y"})
    cells = cells.merge(image_df[["ImageNumber"] + meta_cols], on="ImageNumber", how="left",
                        indicator="_has_image")
    cells = cells.merge(fields, on="ImageNumber", how="left").copy()
    cells["_cell_id"] = cells["ImageNumber"].astype(str) + "-" + cells["ObjectNumber"].astype(str)
    return cells, source_files, image_csv


def load_table_cells(path, crop_column: str | None = None):
    """Cells of a CytoTable/pycytominer single-cell table, each with a crop file (`_crop_path`,
    absolute) and a `_cell_id`. Returns (cells, [path], path)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file. With --table, INPUT is a single-cell "
                             "CSV or Parquet file.")
    cells = read_table(path)
    column = crop_column or next((c for c in CROP_COLUMN_CANDIDATES if c in cells.columns), None)
    if column is None or column not in cells.columns:
        raise UserInputError(
            f"{path}: no crop file column {column or '(tried ' + ', '.join(CROP_COLUMN_CANDIDATES) + ')'}; "
            "name the column of crop files with --crop-column.")
    base = path.resolve().parent
    cells["_crop_path"] = [None if pd.isna(p) else os.path.normpath(
        str(p) if os.path.isabs(str(p)) else str(base / str(p))) for p in cells[column]]
    for key, target in (("Metadata_ImageNumber", "ImageNumber"), ("Metadata_ObjectNumber", "ObjectNumber")):
        cells[target] = cells[key] if key in cells.columns else (
            np.arange(len(cells)) + 1 if target == "ObjectNumber" else 0)
    cells["_cell_id"] = (cells["ImageNumber"].astype(str) + "-" + cells["ObjectNumber"].astype(str)
                         if "Metadata_ObjectNumber" in cells.columns
                         else pd.Series(np.arange(len(cells)).astype(str)))
    cells = cells.drop(columns=[column])
    return cells, [path], path


def table_compartments(columns) -> list[str]:
    """The object sets (compartments) a single-cell table's columns are prefixed with."""
    skip = {"Metadata", "Image", "ImageNumber", "ObjectNumber"}
    return sorted({compartment_of(c) for c in columns if "_" in c and compartment_of(c) not in skip})
