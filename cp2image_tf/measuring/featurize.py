"""CellProfiler-style measurements for images and label masks that have no CellProfiler run.

`featurize(load_data_csv, out_dir, channels, objects)` reads a CellProfiler LoadData CSV (one row
per image set: `FileName_<channel>` / `PathName_<channel>` for each channel,
`ObjectsFileName_<object>` / `ObjectsPathName_<object>` for each label mask, optional
`ImageNumber` and `Metadata_*` columns), measures every object with `cp2image_tf.measuring.measure`, and
writes what CellProfiler's ExportToSpreadsheet would:

    out_dir/Image.csv      one row per image set: ImageNumber, FileName_/PathName_ per channel,
                           ObjectsFileName_/ObjectsPathName_ per object set, the Metadata_
                           columns, Count_<object>, Scaling_<channel>
    out_dir/<object>.csv   one row per object: ImageNumber, ObjectNumber, Location_Center_X/_Y,
                           then the measurements (AreaShape_Area, Intensity_MeanIntensity_DNA, ...)

Images are 2-D TIFFs; integers are divided by their dtype's maximum (255, 65535), as CellProfiler
does, unless `scale` says otherwise (e.g. 4095 for 12-bit data in 16-bit files); float TIFFs are
taken as they are. A mask's labels are the ObjectNumbers. A relative PathName in the CSV is read
relative to the CSV's folder and written relative to `out_dir`, so a folder tree that holds both
can be moved; an absolute one stays absolute.

Image sets are measured in parts of `part_size` image sets each: a part is a pure, idempotent
function that writes its own Image.csv and object CSVs to `out_dir/.parts/part-<k>-of-<n>/`
(under a temporary name, renamed when complete, with a summary holding each file's sha256).
Parts run in this process, in a process pool (`workers` > 1), on Dask (`scheduler`: "local" for
a LocalCluster of `workers` processes, or a scheduler's address; see tfrecords_tools.parts), or
one group at a time (`part=(I, N)`, e.g. a Slurm array) followed by `finalize=True`. The final
step concatenates the parts in order into the CSVs (under temporary names, renamed when
complete): the same bytes however the parts ran. Memory holds a part, not the experiment. An
interrupted run, run again, redoes only the parts that do not verify by checksum.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import tifffile

from cp2image_tf.measuring.measure import DEFAULT_MODULES, measure_objects, resolve_modules
from tfrecords_tools.atomic import partial_path, write_json
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import sha256_file
from tfrecords_tools.parts import (PARTS, check_options, client_for, parse_part, part_label,
                                   run_parts, select_part, verify_part, write_partition)

__all__ = ["featurize", "DEFAULT_MODULES"]

FLOAT_FORMAT = "%.9g"  # round-trips float32, the precision every later stage uses
PART_SIZE = 8  # image sets per part


def featurize(load_data_csv, out_dir, channels, objects, modules=DEFAULT_MODULES, workers=1,
              overwrite=False, scale=None, progress=True, scheduler=None, part=None,
              finalize=False, part_size=PART_SIZE, client=None) -> dict:
    """Measure every object of every image set in `load_data_csv`; write CellProfiler CSVs.

    `channels` and `objects` name the images and label masks to use (`FileName_<channel>`,
    `ObjectsFileName_<object>` columns). `modules`: names from `cp2image_tf.measuring.measure.MODULES`,
    "default" or "all". `scale` (integer images only): None (the dtype's maximum), one number
    for every channel, or {channel: number}. `workers` > 1 measures parts in that many
    processes (with `scheduler="local"`: a LocalCluster of that many). `scheduler`: a Dask
    scheduler's address, or "local". `part=(I, N)` (or "I/N") measures only the I-th of N groups
    of parts and returns that group's summary; `finalize=True` then writes the CSVs from the
    completed parts. Returns a summary: counts, feature numbers, output paths, seconds.
    """
    part = parse_part(part)
    check_options(scheduler, workers, part, finalize)
    with client_for(scheduler, workers, client, finalize, quiet=not progress) as client:
        return _featurize(load_data_csv, out_dir, channels, objects, modules, workers, overwrite,
                          scale, progress, scheduler, part, finalize, part_size, client)


def _featurize(load_data_csv, out_dir, channels, objects, modules, workers, overwrite, scale,
               progress, scheduler, part, finalize, part_size, client) -> dict:
    started = time.perf_counter()
    load_data_csv = Path(load_data_csv)
    out_dir = Path(out_dir)
    if int(part_size) < 1:
        raise UserInputError(f"--part-size {part_size}: must be at least 1.")
    if part is not None and overwrite:
        raise UserInputError("--overwrite with --part: parts of one job run at the same time; "
                             "remove the old outputs first.")
    channels, objects = _names(channels, "--channels"), _names(objects, "--objects")
    if "Image" in objects:
        raise UserInputError("--objects: 'Image' names CellProfiler's per-image table; rename "
                             "that object set (e.g. ObjectsFileName_Cells).")
    modules = resolve_modules(modules)
    scales = _scales(scale, channels)
    table = _read_load_data(load_data_csv)
    tasks = _tasks(table, load_data_csv, channels, objects, modules, scales)
    outputs = {"Image": out_dir / "Image.csv",
               **{obj: out_dir / f"{obj}.csv" for obj in objects}}
    _check_out_dir(out_dir, outputs.values(), overwrite)
    parts = _parts(tasks, table, out_dir, objects, int(part_size))
    parts_dir = out_dir / PARTS
    if finalize and not parts_dir.is_dir():
        raise UserInputError(f"{out_dir}: no parts to finalize ({PARTS} not found); run the "
                             "parts first (--part I/N) with the same LOAD_DATA_CSV, OUT_DIR and "
                             "options.")
    parts_dir.mkdir(parents=True, exist_ok=True)
    if part is not None:
        write_partition(parts_dir, part[1], len(parts))

    if not finalize:
        selected = select_part(parts, part)
        todo = [p for p in selected if _check_part(p)[1] is not None]
        if progress and len(todo) < len(selected):
            print(f"Resuming: {len(selected) - len(todo)} of {len(selected)} parts already "
                  "complete.", file=sys.stderr)
        try:
            for _ in run_parts(measure_part, todo, [f"featurize-{p['name']}-{p['hash'][:16]}"
                                                    for p in todo],
                               cells=lambda s: s["rows"][objects[0]], scheduler=scheduler,
                               workers=workers, progress=progress, desc="featurize",
                               unit="part", client=client,
                               total_cells=None):
                pass
        finally:
            if parts_dir.is_dir() and not any(parts_dir.iterdir()):
                parts_dir.rmdir()  # nothing completed: leave no trace
        if part is not None:
            return {"part": list(part), "parts": [p["name"] for p in selected],
                    "measured": len(todo), "image_sets": sum(len(p["tasks"]) for p in selected),
                    "seconds": round(time.perf_counter() - started, 1)}
    summaries = []
    for position, entry in enumerate(parts):
        summary, problem = _check_part(entry)
        if problem:
            label = part_label(position, len(parts), parts_dir)
            which = f"part {label} " if label else ""
            raise UserInputError(f"{out_dir}: {which}({entry['name']}) is not complete: "
                                 f"{problem}. Measure it again, then --finalize.")
        summaries.append(summary)
    rows = _concatenate(parts, summaries, outputs, objects)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return {
        "out_dir": str(out_dir),
        "image_sets": len(tasks),
        "objects": {obj: rows[obj][0] for obj in objects},
        "features": {obj: len(rows[obj][1]) - 4 for obj in objects if rows[obj][1]},
        "modules": list(modules),
        "files": {key: str(path) for key, path in outputs.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------
# Parts: groups of image sets, each measured and written on its own


def _parts(tasks: list[dict], table: pd.DataFrame, out_dir: Path, objects, size: int):
    count = (len(tasks) + size - 1) // size
    parts = []
    for k in range(count):
        chunk = tasks[k * size:(k + 1) * size]
        name = f"part-{k:05d}-of-{count:05d}"
        sources = [{c: table.at[t["row"], c] for c in table.columns} for t in chunk]
        entry = {"name": name, "dir": str(out_dir / PARTS / name), "out_dir": str(out_dir),
                 "objects": list(objects), "tasks": chunk, "sources": sources}
        digest = hashlib.sha256()
        digest.update(repr((name, list(objects), str(out_dir.resolve()))).encode())
        for task, source in zip(chunk, sources):
            digest.update(repr(sorted((k2, str(v)) for k2, v in task.items())).encode())
            digest.update(repr(sorted(source.items())).encode())
        entry["hash"] = digest.hexdigest()
        parts.append(entry)
    return parts


def measure_part(entry: dict) -> dict:
    """Measure a part's image sets; write its CSVs and summary to .parts/<name>. Pure and
    idempotent: the same part gives the same bytes."""
    final = Path(entry["dir"])
    tmp = partial_path(final)
    tmp.mkdir(parents=True)
    out_dir = Path(entry["out_dir"])
    writers = {obj: _ObjectWriter(tmp / f"{obj}.csv", placeholder=False)
               for obj in entry["objects"]}
    image_rows = []
    try:
        for task, source in zip(entry["tasks"], entry["sources"]):
            scaling, tables = measure_image_set(task)
            image_rows.append(_image_row(task, pd.Series(source), out_dir, scaling, tables))
            for obj in entry["objects"]:
                writers[obj].append(task["image_number"], tables[obj])
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written part left behind
        raise
    for writer in writers.values():
        writer.close()
    pd.DataFrame(image_rows).to_csv(tmp / "Image.csv", index=False, float_format=FLOAT_FORMAT)
    files = ["Image.csv"] + [f"{obj}.csv" for obj in entry["objects"]]
    summary = {"name": entry["name"], "hash": entry["hash"], "image_sets": len(image_rows),
               "rows": {obj: w.rows for obj, w in writers.items()},
               "columns": {obj: w.columns for obj, w in writers.items()},
               "sha256": {name: sha256_file(tmp / name) for name in files}}
    write_json(tmp / "summary.json", summary, sync=False, default=str)
    if final.exists():
        shutil.rmtree(final)  # an earlier, incomplete or corrupt copy
    os.replace(tmp, final)
    return summary


def _check_part(entry: dict) -> tuple[dict | None, str | None]:
    """(summary, None) for a completed part that verifies by checksum, else (None, why not)."""
    folder = Path(entry["dir"])
    files = ["Image.csv"] + [f"{obj}.csv" for obj in entry["objects"]]
    return verify_part(folder / "summary.json", entry["hash"], "hash",
                       lambda summary: [(folder / name, summary.get("sha256", {}).get(name))
                                        for name in files])


def _concatenate(parts, summaries, outputs: dict, objects) -> dict:
    """The parts' CSVs, in part order, into the outputs: {object: (rows, columns)}."""
    partial = {key: partial_path(path) for key, path in outputs.items()}
    result = {}
    try:
        for key in outputs:
            name = f"{key}.csv"
            header, rows = None, 0
            if key != "Image":
                header = next((s["columns"][key] for s in summaries if s["columns"][key]), None)
                rows = sum(s["rows"][key] for s in summaries)
            with open(partial[key], "w", newline="") as out:
                if key != "Image" and header is None:
                    out.write(",".join(_EMPTY_HEADER) + "\n")
                first = True
                for entry, summary in zip(parts, summaries):
                    path = Path(entry["dir"]) / name
                    if key == "Image":
                        _append_csv(out, path, None, header_too=first)
                    elif summary["columns"][key]:
                        _append_csv(out, path, header if summary["columns"][key] != header
                                    else None, header_too=first)
                    else:
                        continue
                    first = False
            result[key] = (rows, header)
        for key, path in outputs.items():
            os.replace(partial[key], path)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return result


def _append_csv(out, path: Path, columns, header_too: bool):
    """Copy a part's CSV (its header only if header_too); reindexed to `columns` if given."""
    if columns is not None:  # another header than the first part's: as one writer would have
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
        table.reindex(columns=columns).to_csv(out, index=False, header=header_too,
                                              na_rep="nan")
        return
    with open(path, newline="") as handle:
        head = handle.readline()
        if header_too:
            out.write(head)
        shutil.copyfileobj(handle, out)


# ---------------------------------------------------------------------------------------------
# Checking what the user gave


def _names(value, option: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UserInputError(f"{option}: give at least one name.")
    if len(set(names)) != len(names):
        raise UserInputError(f"{option}: names repeat ({', '.join(names)}); give each once.")
    return names


def _scales(scale, channels: list[str]) -> dict[str, float | None]:
    if scale is None or isinstance(scale, (int, float)):
        values = {ch: scale for ch in channels}
    else:
        unknown = sorted(set(scale) - set(channels))
        if unknown:
            raise UserInputError(f"scale is given for {', '.join(unknown)}, which are not among "
                                 f"the channels ({', '.join(channels)}).")
        values = {ch: scale.get(ch) for ch in channels}
    for ch, value in values.items():
        if value is not None and not value > 0:
            raise UserInputError(f"--scale for {ch} is {value}: it must be a positive number "
                                 "(the value that becomes 1.0, e.g. 65535 or 4095).")
    return values


def _read_load_data(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserInputError(f"LoadData CSV not found: {path}; give the path of a CSV with "
                             "FileName_<channel> and PathName_<channel> columns.")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path} is not a readable CSV ({err}).") from None
    if table.empty:
        raise UserInputError(f"{path} has no rows; it needs one row per image set.")
    return table


def _tasks(table: pd.DataFrame, csv: Path, channels, objects, modules, scales) -> list[dict]:
    """One task per image set: absolute file paths, checked to exist."""
    need = [(f"FileName_{ch}", f"PathName_{ch}", f"channel '{ch}'") for ch in channels]
    need += [(f"ObjectsFileName_{obj}", f"ObjectsPathName_{obj}", f"object '{obj}'")
             for obj in objects]
    for name_col, path_col, what in need:
        missing = [c for c in (name_col, path_col) if c not in table.columns]
        if missing:
            raise UserInputError(f"{csv} has no {' or '.join(missing)} column for {what}; "
                                 "add it or fix the name (columns: "
                                 f"{_short_list(table.columns)}).")
    numbers = _image_numbers(table, csv)
    tasks, missing_files = [], []
    for row, number in zip(table.index, numbers):
        files = {}
        for name_col, path_col, _ in need:
            folder = Path(table.at[row, path_col])
            file = (folder if folder.is_absolute() else csv.parent / folder) / table.at[row,
                                                                                       name_col]
            if not table.at[row, name_col] or not file.is_file():
                missing_files.append((number, name_col, file))
            files[name_col] = file
        tasks.append({"row": row, "image_number": number, "modules": modules,
                      "images": {ch: files[f"FileName_{ch}"] for ch in channels},
                      "masks": {obj: files[f"ObjectsFileName_{obj}"] for obj in objects},
                      "scales": scales})
    if missing_files:
        number, column, file = missing_files[0]
        more = f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""
        raise UserInputError(f"file not found: {file} (ImageNumber {number}, {column} in {csv})"
                             f"{more}; fix the FileName_/PathName_ values or the files.")
    return tasks


def _image_numbers(table: pd.DataFrame, csv: Path) -> list[int]:
    if "ImageNumber" not in table.columns:
        return list(range(1, len(table) + 1))
    numbers = pd.to_numeric(table["ImageNumber"], errors="coerce")
    if numbers.isna().any() or (numbers % 1 != 0).any() or numbers.duplicated().any():
        raise UserInputError(f"{csv}: the ImageNumber column must hold distinct whole numbers; "
                             "fix it or drop the column to number image sets 1..N.")
    return [int(n) for n in numbers]


def _short_list(columns, limit: int = 12) -> str:
    columns = list(columns)
    return ", ".join(columns[:limit]) + (", ..." if len(columns) > limit else "")


def _check_out_dir(out_dir: Path, outputs: Iterable[Path], overwrite: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir} is a file; give a folder for the CSVs.")
    existing = [p.name for p in outputs if p.exists()]
    if existing and not overwrite:
        raise UserInputError(f"{out_dir} already holds {', '.join(existing)}; pass --overwrite "
                             "to replace them or choose another folder.")


# ---------------------------------------------------------------------------------------------
# Measuring image sets


def measure_image_set(task: dict) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Read one image set's images and masks, measure it: ({channel: scaling}, tables)."""
    images, scaling = {}, {}
    for ch, path in task["images"].items():
        images[ch], scaling[ch] = _read_image(path, task["scales"][ch])
    masks = {obj: _read_mask(path) for obj, path in task["masks"].items()}
    _check_shapes(task, images, masks)
    integer_range = max(scaling.values())
    tables = measure_objects(images, masks, task["modules"],
                             scale_max=int(integer_range) if integer_range > 1 else 65535)
    return scaling, tables


def _read_plane(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises several types for unreadable files
        raise UserInputError(f"cannot read {path} as a TIFF ({err}).") from None
    array = np.squeeze(array)
    if array.ndim != 2:
        raise UserInputError(f"{path} has shape {array.shape}; expected one 2-D plane "
                             "(one file per channel, one label image per object set).")
    return array


def _read_image(path: Path, scale: float | None) -> tuple[np.ndarray, float]:
    """The image in CellProfiler's [0, 1] scale, and the divisor used (its Scaling_)."""
    array = _read_plane(path)
    if np.issubdtype(array.dtype, np.integer):
        divisor = float(scale) if scale is not None else float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        divisor = 1.0
    else:
        raise UserInputError(f"{path} holds {array.dtype} pixels; expected integer or float.")
    return array.astype(np.float64) / divisor, divisor


def _read_mask(path: Path) -> np.ndarray:
    array = _read_plane(path)
    if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise UserInputError(f"{path} is not a label image (dtype {array.dtype}); expected "
                             "non-negative integer labels, 0 for background.")
    return array


def _check_shapes(task: dict, images: dict, masks: dict):
    shapes = {f"{ch} image {task['images'][ch].name}": a.shape for ch, a in images.items()}
    shapes.update({f"{obj} mask {task['masks'][obj].name}": a.shape for obj, a in masks.items()})
    if len(set(shapes.values())) > 1:
        found = ", ".join(f"{what} is {'x'.join(map(str, s))}" for what, s in shapes.items())
        raise UserInputError(f"ImageNumber {task['image_number']}: images and masks differ in "
                             f"shape ({found}); every file of an image set must have one shape.")


# ---------------------------------------------------------------------------------------------
# Writing


def _image_row(task: dict, source: pd.Series, out_dir: Path, scaling: dict, tables: dict):
    row = {"ImageNumber": task["image_number"]}
    for prefix, files in (("", task["images"]), ("Objects", task["masks"])):
        for name in files:
            row[f"{prefix}FileName_{name}"] = source[f"{prefix}FileName_{name}"]
            row[f"{prefix}PathName_{name}"] = _written_path(source[f"{prefix}PathName_{name}"],
                                                            files[name].parent, out_dir)
    row.update({c: source[c] for c in source.index if c.startswith("Metadata_")})
    row.update({f"Count_{obj}": len(t) for obj, t in tables.items()})
    row.update({f"Scaling_{ch}": value for ch, value in scaling.items()})
    return row


def _written_path(given: str, folder: Path, out_dir: Path) -> str:
    if Path(given).is_absolute():
        return given
    return Path(os.path.relpath(folder.resolve(), out_dir.resolve())).as_posix()


_EMPTY_HEADER = ("ImageNumber", "ObjectNumber", "Location_Center_X", "Location_Center_Y")


class _ObjectWriter:
    """Streams one object set's rows to its CSV; the first non-empty table fixes the header.
    With no rows, the file holds `_EMPTY_HEADER` (or nothing, if not `placeholder`)."""

    def __init__(self, path: Path, placeholder: bool = True):
        self.placeholder = placeholder
        self.handle = open(path, "w", newline="")
        self.columns: list[str] | None = None
        self.rows = 0

    def append(self, image_number: int, table: pd.DataFrame):
        if not len(table):
            return
        table = table.copy()
        table.insert(0, "ImageNumber", image_number)
        header = self.columns is None
        if header:
            self.columns = list(table.columns)
        table.reindex(columns=self.columns).to_csv(
            self.handle, index=False, header=header, float_format=FLOAT_FORMAT, na_rep="nan")
        self.rows += len(table)

    def close(self):
        if not self.handle.closed and self.columns is None and self.placeholder:
            self.handle.write(",".join(_EMPTY_HEADER) + "\n")
        self.handle.close()
