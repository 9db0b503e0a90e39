"""Reading what CellProfiler's ExportToSpreadsheet writes, and the images it names.

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


def require_columns(df: pd.DataFrame, columns, path, what: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserInputError(f"{path}: missing column(s) {', '.join(missing)}{what}.")


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


def image_shape(path: str) -> tuple[int, int]:
    """(Y, X) of an image from its header, without decoding pixels."""
    import tifffile

    if path.endswith(".npy"):
        return tuple(np.load(path, mmap_mode="r").shape[-2:])
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
    except FileNotFoundError:
        raise UserInputError(f"{path}: image file not found.") from None
    except Exception as err:
        raise UserInputError(f"{path}: cannot be read as an image ({err}).") from None
    shape = tuple(s for s in shape if s != 1) if len(shape) > 2 else tuple(shape)
    return shape
