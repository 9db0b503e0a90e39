"""convert's plan, made from the tables a chunk at a time: memory does not grow with the screen.

The plan says which cells are converted (and why others are not), their split, the features
kept and which shard each cell goes to. It is made in two streaming passes and written to a
plan folder (`OUT_DIR/.parts/plan-<key>/`) that the shard writers read:

1. The object tables are read a chunk at a time (`tfrecords_tools.streaming`) and joined on
   ImageNumber and ObjectNumber image set by image set: the tables are in ImageNumber order, as
   CellProfiler writes them, so the first table's chunk is joined with the rows of the same image
   sets of the others, held only until the first table moves past them. Each cell is checked
   (the same checks, in the same order, as ever), a field's image headers are read the first
   time one of its cells survives, and the cells kept are appended to segments on disk:
   `seg-<k>.values.npy` (the candidate features, float32) and `seg-<k>.cells.npy` (numbers,
   position, group and treatment codes). Rejected cells go to one file per reason, in row order.
   What stays in memory is per image set and per group (counts, treatment), never per cell.
2. With every group's cell count known, groups are split (`assign_group_splits`); one pass over
   the segments finds the features that are all-NaN or constant in the training split; shards
   are laid out from the per-image-set counts (a table's cells: from per-row codes, to order
   files). A shard is a list of row ranges into the segments.

Results equal those of reading every table whole: the same cells, rejects (same order), splits,
features and shard contents, so the same shards and manifest, byte for byte.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools import cellprofiler as cp
from tfrecords_tools import measured as ms
from tfrecords_tools import streaming
from tfrecords_tools.atomic import write_json
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import select_features
from tfrecords_tools.manifest import sha256_file
from tfrecords_tools.splits import SPLITS, assign_group_splits, group_keys

PLAN = "plan.json"
GROUPS = "groups.json"
SEGMENTS = "segments.json"
KEYS = ["ImageNumber", "ObjectNumber"]
TREATMENT_CANDIDATES = ("Metadata_Treatment", "Metadata_Compound", "Metadata_pert_iname",
                        "Metadata_JCP2022", "Metadata_broad_sample", "Metadata_Perturbation")
CELL_DTYPE = np.dtype([("image", "<i8"), ("object", "<i8"), ("x", "<f8"), ("y", "<f8"),
                       ("group", "<i4"), ("treatment", "<i4")])


class Watermark:
    """The most table rows the planner held at once (the memory bound, tested by value)."""

    def __init__(self):
        self.peak = 0

    def hold(self, rows: int) -> None:
        self.peak = max(self.peak, int(rows))


def pick_column(columns, requested, candidates, option, source):
    if requested:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise UserInputError(f"{option} {','.join(requested)}: no column {', '.join(missing)} "
                                 f"in {source}.")
        return list(requested)
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        for name in (cand, "Image_" + cand):
            if name.lower() in lower:
                return [lower[name.lower()]]
    return []


def plan_key(config) -> str:
    """What the plan depends on: the options that decide the dataset and the sizes and
    modification times of the tables and the --features-file (a fixed table is a new plan)."""
    options = {k: v for k, v in asdict(config).items() if k not in config.RUN_OPTIONS}
    root = Path(config.input)
    paths = [p for p in (sorted(root.iterdir()) if root.is_dir() else [root])
             if p.suffix in (".csv", ".parquet")]
    paths += [Path(config.features_file)] if config.features_file else []
    files = []
    for path in paths:
        if path.is_file():
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"options": options, "files": files, "format": 1}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------
# Pass 1: the tables, a chunk at a time


class _Segments:
    """Kept cells appended to numbered segment files, and rejected ones to per-reason files."""

    def __init__(self, folder: Path, reasons: list[str]):
        self.folder = folder
        self.sizes = []
        self.kept = 0
        self.reasons = reasons
        self.reject_counts = [0] * len(reasons)
        self._handles = {}

    def add(self, values: np.ndarray, cells: np.ndarray, text: dict | None = None) -> None:
        if not len(cells):
            return
        k = len(self.sizes)
        np.save(self.folder / f"seg-{k:05d}.values.npy", np.ascontiguousarray(values, np.float32))
        np.save(self.folder / f"seg-{k:05d}.cells.npy", cells)
        for name, array in (text or {}).items():
            np.save(self.folder / f"seg-{k:05d}.{name}.npy", np.asarray(array, dtype=str))
        self.sizes.append(len(cells))
        self.kept += len(cells)

    def reject(self, step: int, cell_ids, images, objects) -> None:
        if not len(cell_ids):
            return
        handle = self._handles.get(step)
        if handle is None:
            handle = self._handles[step] = open(self.folder / f"rejects-{step:03d}.csv", "w",
                                                newline="")
        writer = csv.writer(handle, lineterminator="\n")
        reason = self.reasons[step]
        for cell_id, image, obj in zip(cell_ids, images, objects):
            writer.writerow([cell_id, _csv_value(image), _csv_value(obj), reason])
        self.reject_counts[step] += len(cell_ids)

    def close_rejects(self) -> None:
        """rejects.csv: the reasons in the order the checks run, each in row order."""
        for handle in self._handles.values():
            handle.close()
        with open(self.folder / "rejects.csv", "w", newline="") as out:
            out.write("cell_id,ImageNumber,ObjectNumber,reason\n")
            for step in range(len(self.reasons)):
                part = self.folder / f"rejects-{step:03d}.csv"
                if part.exists():
                    with open(part) as handle:
                        shutil.copyfileobj(handle, out)
                    part.unlink()

    def first_reason(self) -> str:
        return next((r for r, n in zip(self.reasons, self.reject_counts) if n), "no rows")

    def by_reason(self) -> dict:
        """rejects.csv's reasons counted as pandas' value_counts orders them."""
        firsts = [(r, n) for r, n in zip(self.reasons, self.reject_counts) if n]
        if not firsts:
            return {}
        merged = {}
        for r, n in firsts:
            merged[r] = merged.get(r, 0) + n
        counts = pd.Series(list(merged.values()), index=list(merged), dtype="int64")
        return {str(k): int(v) for k, v in counts.sort_values(ascending=False).items()}


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


class _FollowingTable:
    """A later object table read alongside the first: the rows of the image sets the first
    table's current chunk holds, each image set's rows kept until the first table moves on."""

    def __init__(self, path, columns, chunk_rows, watermark, features=None):
        self.path = path
        self.columns = columns
        self.chunks = streaming.iter_chunks(path, columns, [], chunk_rows, features=features)
        self.buffer = None
        self.done = False
        self.last = None
        self.rows = 0
        self.watermark = watermark
        self.once = _OnceEach(path)

    def rows_through(self, low: int, high: int) -> pd.DataFrame:
        """Its rows with low <= ImageNumber <= high; rows below `low` are dropped."""
        while not self.done and (self.buffer is None or len(self.buffer) == 0
                                 or self.buffer["ImageNumber"].iloc[-1] <= high):
            try:
                start, frame = next(self.chunks)
            except StopIteration:
                self.done = True
                break
            if not len(frame):
                continue
            frame = _keys(frame, self.path, start)
            self.last = _check_order(self.path, frame["ImageNumber"].to_numpy(), start,
                                     self.last)
            self.once.check(frame["ImageNumber"].to_numpy(), frame["ObjectNumber"].to_numpy(),
                            start)
            self.rows += len(frame)
            self.buffer = frame if self.buffer is None else pd.concat([self.buffer, frame],
                                                                      ignore_index=True)
            self.watermark.hold(len(self.buffer))
        if self.buffer is None:
            return pd.DataFrame({c: np.zeros(0, np.int64 if c in KEYS else np.float64)
                                 for c in self.columns})
        image = self.buffer["ImageNumber"].to_numpy()
        selected = self.buffer[(image >= low) & (image <= high)]
        self.buffer = self.buffer[image >= high].reset_index(drop=True)
        return selected


class _OnceEach:
    """Each (ImageNumber, ObjectNumber) once in a table read a chunk at a time: the table is in
    ImageNumber order, so a repeat is within the current image set, whose objects (and their
    rows) are all it holds between chunks."""

    def __init__(self, path):
        self.path = path
        self.image = None
        self.rows = {}  # ObjectNumber -> row (0-based) of the current image set's objects

    def check(self, image: np.ndarray, obj: np.ndarray, start: int) -> None:
        pairs = pd.MultiIndex.from_arrays([image, obj])
        again = pairs.duplicated(keep="first")
        if self.image is not None:
            again |= (image == self.image) & np.isin(obj, list(self.rows))
        if again.any():
            self._refuse(image, obj, start, int(np.flatnonzero(again)[0]))
        last = image[-1]
        if last != self.image:
            self.image, self.rows = last, {}
        for i in np.flatnonzero(image == last).tolist():
            self.rows[int(obj[i])] = start + i

    def _refuse(self, image, obj, start, i) -> None:
        number, key = int(image[i]), int(obj[i])
        same = np.flatnonzero((image[:i] == number) & (obj[:i] == key))
        first = start + int(same[0]) if len(same) else self.rows[key]
        raise UserInputError(f"{self.path}: ImageNumber {number}, ObjectNumber {key} is listed "
                             f"twice (rows {first + 2} and {start + i + 2}); each object must "
                             "have one row. Remove the duplicate rows (e.g. an image set exported "
                             "twice) and convert again.")


def _match(image, obj_numbers, right: pd.DataFrame) -> np.ndarray:
    """For each (ImageNumber, ObjectNumber), its row in `right`, or -1 (the left join; each
    object is in `right` once, as _OnceEach checked when it was read)."""
    if not len(right):
        return np.full(len(image), -1)
    index = pd.MultiIndex.from_arrays([right["ImageNumber"].to_numpy(),
                                       right["ObjectNumber"].to_numpy()])
    return index.get_indexer(pd.MultiIndex.from_arrays([image, obj_numbers]))


def _unsorted(path, row: int, number: int, before: int) -> UserInputError:
    return UserInputError(f"{path}: row {row + 2}: ImageNumber {number} comes after {before}; "
                          "convert reads the object tables in ImageNumber order, as CellProfiler "
                          "writes them. Sort the table by ImageNumber (e.g. in pandas: "
                          "sort_values('ImageNumber', kind='stable')) and convert again.")


def _keys(frame: pd.DataFrame, path, start: int) -> pd.DataFrame:
    """ImageNumber and ObjectNumber as int64; a row without one is an error naming it."""
    for column in KEYS:
        values = frame[column].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserInputError(f"{path}: row {start + row + 2}, column {column} holds "
                                 f"{frame[column].iloc[row]!r}, not a whole number; fix or "
                                 "remove that row, or export the table from CellProfiler again.")
        frame[column] = values.astype(np.int64)
    return frame


def _object_columns(path, obj: str, first: bool) -> dict:
    """{<obj>_<column>: column} of one object table's measurements, its keys (and, for the first
    table, its centre) checked."""
    header = streaming.table_columns(path)
    need = KEYS + (["Location_Center_X", "Location_Center_Y"] if first else [])
    missing = [c for c in need if c not in header]
    if missing:
        raise UserInputError(f"{path}: missing column(s) {', '.join(missing)}"
                             f"{' (needed to place crops)' if first else ''}.")
    measured = [c for c in header if c not in KEYS and not c.startswith("Metadata_")]
    return {f"{obj}_{c}": c for c in measured}


def _candidates(columns, compartments, config, source) -> list[str]:
    """The candidate feature names (select_features on the column names alone: every column
    read is read as numbers, and a value that is not one stops the read naming its row)."""
    frame = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in columns})
    return select_features(frame, compartments, config.include, config.exclude,
                           config.features_file, source=str(source))


def _image_table(config):
    """Image.csv's columns convert uses, whole (one row per image set)."""
    folder = Path(config.input)
    image_csv = cp.find_table(folder, cp.IMAGE_TABLE)
    header = streaming.table_columns(image_csv)
    wanted = [c for c in header if c == "ImageNumber" or c.startswith(("Metadata_", "FileName_",
                                                                        "PathName_"))]
    image_df = cp.read_table(image_csv, columns=wanted)
    cp.require_columns(image_df, ["ImageNumber"], image_csv)
    cp.require_rows(image_df, image_csv, "image sets")
    cp.require_numeric(image_df, ["ImageNumber"], image_csv)
    if image_df["ImageNumber"].duplicated().any():
        dup = image_df["ImageNumber"][image_df["ImageNumber"].duplicated()].iloc[0]
        raise UserInputError(f"{image_csv}: ImageNumber {dup} appears twice; merge batches "
                             "with distinct ImageNumbers.")
    return image_csv, image_df


def _object_tables(config) -> tuple[list, dict, list]:
    """([(object, table path)], {object: {feature name: column}}, every column named)."""
    tables, renamed, columns = [], {}, list(KEYS)
    for k, obj in enumerate(config.objects):
        path = cp.find_table(Path(config.input), obj)
        names = _object_columns(path, obj, k == 0)
        tables.append((obj, path))
        renamed[obj] = names
        columns += list(names)
    return tables, renamed, columns


def _cellprofiler_inputs(config, image_settings) -> dict:
    """What pass 1 reads before any object row: Image.csv, the object tables' columns, the
    candidate features, the measured images, the treatment and grouping columns."""
    image_csv, image_df = _image_table(config)
    source = image_csv
    paths = {ch: cp.channel_paths(image_df, ch, image_csv) for ch in config.channels}
    meta_cols = [c for c in image_df.columns if c.startswith("Metadata_")]
    tables, renamed, columns = _object_tables(config)
    first = config.objects[0]
    centre = {f"{first}_Location_Center_X": "_x", f"{first}_Location_Center_Y": "_y"}
    columns = [centre.get(c, c) for c in columns] + meta_cols
    measured_as = ms.pair_channels(config.channels, ms.measured_images(columns),
                                   config.measured_as, source)
    selection = _candidates([c for c in columns if not c.startswith("_")],
                            list(config.objects), config, source)
    image_level = [n for n in selection.names if n in meta_cols]
    if image_level:
        raise UserInputError(f"{config.features_file}: {', '.join(image_level)} is a column of "
                             f"{source} (one value per image set), not a measurement of an "
                             "object; leave it out of the features file.")
    image_info = image_settings(source, config)
    treatment_cols = pick_column(["ImageNumber"] + meta_cols, config.treatment_column,
                                 TREATMENT_CANDIDATES, "--treatment-column", source)
    return {"image_csv": image_csv, "image_df": image_df, "source": source, "paths": paths,
            "meta_cols": meta_cols, "tables": tables, "renamed": renamed,
            "measured_as": measured_as, "selection": selection, "names": selection.names,
            "image_info": image_info, "treatment_columns": treatment_cols,
            "split_by": config.split_by or ["ImageNumber"]}


def _treatment_text(frame: pd.DataFrame, treatment_cols) -> pd.Series:
    """Each row's treatment: its treatment column, or several joined by '@'."""
    if len(treatment_cols) > 1:
        return frame[treatment_cols].astype(str).agg("@".join, axis=1)
    return frame[treatment_cols[0]].astype(str)


def _image_sets(config, inputs) -> dict:
    """Per image set (Image.csv row): what each of its cells gets, looked up by position (its
    group and treatment codes, and whether a channel, an illumination function or the
    treatment is missing)."""
    image_df, treatment_cols = inputs["image_df"], inputs["treatment_columns"]
    image_keys = list(image_df["ImageNumber"].to_numpy())
    groups_of_image = group_keys(image_df, inputs["split_by"], inputs["source"]).to_numpy()
    if treatment_cols:
        no_treatment = image_df[treatment_cols].astype("string").isna().any(axis=1).to_numpy()
        treatment = _treatment_text(image_df, treatment_cols).to_numpy()
    else:
        no_treatment = np.zeros(len(image_df), dtype=bool)
        treatment = np.full(len(image_df), "", dtype=object)
    illum_paths = {}
    if config.illum:
        position = pd.Index(inputs["image_info"]["ImageNumber"].to_numpy())
        at = position.get_indexer(image_df["ImageNumber"].to_numpy())
        for ch in config.illum:
            column = inputs["image_info"][f"_illum_{ch}"].to_numpy(dtype=object)
            illum_paths[ch] = [column[i] if i >= 0 else None for i in at]
    group_codes, group_names = pd.factorize(pd.Series(groups_of_image, dtype=object))
    treatment_codes, treatment_names = pd.factorize(pd.Series(treatment, dtype=object))
    missing = [np.array([p is None for p in inputs["paths"][ch]]) for ch in config.channels]
    missing += [np.array([p is None for p in illum_paths[ch]]) for ch in config.illum or {}]
    return {"image_keys": image_keys, "index": pd.Index(image_keys), "missing": missing,
            "no_treatment": no_treatment, "illum_paths": illum_paths,
            "group_codes": group_codes, "group_names": [str(g) for g in group_names],
            "treatment_codes": treatment_codes,
            "treatment_names": [str(t) for t in treatment_names]}


def _cellprofiler_reasons(config, treatment_cols) -> list[str]:
    """Why a cell is rejected, in the order the checks run (the last two: no treatment, and
    the image border)."""
    reasons = [f"no {obj} object with this ObjectNumber" for obj in config.objects[1:]]
    reasons += ["ImageNumber not in Image.csv", "no Location_Center_X/Y"]
    reasons += [f"no {ch} image listed for this image set" for ch in config.channels]
    reasons += [f"no {name} (--illum) listed for this image set"
                for name in (config.illum or {}).values()]
    reasons.append(f"no value in {','.join(treatment_cols)}")
    reasons.append(f"within {config.crop_size // 2} px of the image border (--edge skip)")
    return reasons


def _check_order(path, image: np.ndarray, start: int, last) -> int:
    """A table chunk's ImageNumbers never go down (from `last`, the previous chunk's last);
    returns this chunk's last."""
    previous = np.concatenate([[last if last is not None else image[0]], image[:-1]])
    down = np.flatnonzero(image < previous)
    if len(down):
        raise _unsorted(path, start + int(down[0]), int(image[down[0]]), int(previous[down[0]]))
    return int(image[-1])


def _feature_columns(renamed: dict, index: dict) -> tuple[list, np.ndarray, dict]:
    """A table's candidate feature columns, their places in the feature names and
    {column: feature name}."""
    pairs = [(c, index[n]) for n, c in renamed.items() if n in index]
    return ([c for c, _ in pairs], np.array([j for _, j in pairs], dtype=np.int64),
            {c: n for n, c in renamed.items() if n in index})


class _ObjectJoin:
    """The object tables read together, a chunk of the first at a time, each later table's rows
    matched to the chunk's cells on ImageNumber and ObjectNumber (a left join)."""

    def __init__(self, config, inputs, watermark: Watermark):
        index = {n: j for j, n in enumerate(inputs["names"])}
        self.chunk_rows, self.watermark, self.rows = config.chunk_rows, watermark, 0
        (self.obj, self.path), renamed = inputs["tables"][0], inputs["renamed"]
        self.features, self.places, self.feature_names = _feature_columns(renamed[self.obj],
                                                                          index)
        self.following = []
        for obj, path in inputs["tables"][1:]:
            features, places, names = _feature_columns(renamed[obj], index)
            table = _FollowingTable(path, KEYS + features, config.chunk_rows, watermark, names)
            self.following.append((obj, table, features, places))

    def chunks(self):
        """(start, chunk, ImageNumbers, ObjectNumbers, joined) per chunk of the first table;
        joined: per later table, (each cell's row in its rows or -1, its rows, its feature
        columns, their places)."""
        reading = list(dict.fromkeys(KEYS + ["Location_Center_X", "Location_Center_Y"]
                                     + self.features))
        last, once = None, _OnceEach(self.path)
        for start, chunk in streaming.iter_chunks(self.path, reading, [], self.chunk_rows,
                                                  features=self.feature_names):
            if not len(chunk):
                continue
            self.rows += len(chunk)
            chunk = _keys(chunk, self.path, start)
            image = chunk["ImageNumber"].to_numpy()
            obj_numbers = chunk["ObjectNumber"].to_numpy()
            last = _check_order(self.path, image, start, last)
            once.check(image, obj_numbers, start)
            held, joined = len(chunk), []
            for _, table, features, places in self.following:
                right = table.rows_through(int(image.min()), int(image.max()))
                held += len(right) + (len(table.buffer) if table.buffer is not None else 0)
                joined.append((_match(image, obj_numbers, right), right, features, places))
            self.watermark.hold(held)
            yield start, chunk, image, obj_numbers, joined

    def require_rows(self) -> None:
        """Every object table had rows."""
        if not self.rows:
            cp.require_rows(pd.DataFrame(), self.path, f"{self.obj} objects to convert")
        for obj, table, _, _ in self.following:
            if not table.rows:
                cp.require_rows(pd.DataFrame(), table.path, f"{obj} objects to convert")


class _CellProfilerPass:
    """Pass 1 over an ExportToSpreadsheet folder's object tables: each cell checked (in the
    order of `_cellprofiler_reasons`), its field's image headers read when its first cell
    survives, kept cells appended to segments and counted per image set, group and treatment."""

    def __init__(self, config, inputs, sets, segments: _Segments):
        self.config, self.inputs, self.sets, self.segments = config, inputs, sets, segments
        self.images = {}  # ImageNumber -> [kept cells, first kept index, group, treatment]
        self.per_group_treatment = {}
        self.shapes, self.illum_checked = {}, set()
        self.depths = {ch: {} for ch in config.channels}  # dtype -> [fields, a file, number]

    def run(self, join: _ObjectJoin) -> None:
        for start, chunk, image, obj_numbers, joined in join.chunks():
            at = self.sets["index"].get_indexer(image)
            x = chunk["Location_Center_X"].to_numpy(dtype=np.float64)
            y = chunk["Location_Center_Y"].to_numpy(dtype=np.float64)
            step = self._first_failures(at, x, y, joined)
            self._read_headers(image, step < 0, at)
            if self.config.edge == "skip":
                self._skip_border(step, image, x, y)
            for k in range(len(self.segments.reasons)):
                rows = np.flatnonzero(step == k)
                if len(rows):
                    self.segments.reject(
                        k, [f"{a}-{b}" for a, b in zip(image[rows], obj_numbers[rows])],
                        image[rows].tolist(), obj_numbers[rows].tolist())
            keep = np.flatnonzero(step < 0)
            if len(keep):
                self._keep(keep, chunk, image, obj_numbers, x, y, at, join, joined)
        join.require_rows()

    def _first_failures(self, at, x, y, joined) -> np.ndarray:
        """Per cell, the first check it fails before its image is read (-1: none)."""
        known = at >= 0
        safe = np.where(known, at, 0)
        masks = [match < 0 for match, *_ in joined]
        masks += [~known, ~np.isfinite(x) | ~np.isfinite(y)]
        masks += [missing[safe] for missing in self.sets["missing"]]
        masks.append(self.sets["no_treatment"][safe])
        step = np.full(len(at), -1)
        for k, mask in enumerate(masks):
            step[(step < 0) & mask] = k
        return step

    def _read_headers(self, image, alive, at) -> None:
        """Image headers, in the order the image sets' first surviving cells come."""
        paths, config = self.inputs["paths"], self.config
        for i in np.flatnonzero(alive)[np.unique(image[alive], return_index=True)[1]]:
            number = int(image[i])
            if number not in self.shapes:
                field_paths = [paths[ch][at[i]] for ch in config.channels]
                self.shapes[number], dtypes = _field_header(number, field_paths, config)
                for ch, path, dtype in zip(config.channels, field_paths, dtypes):
                    seen = self.depths[ch].setdefault(dtype, [0, path, number])
                    seen[0] += 1
                _check_illum(number, at[i], self.sets["illum_paths"], self.shapes,
                             self.illum_checked, config)

    def _skip_border(self, step, image, x, y) -> None:
        """Cells whose crop would leave the field (--edge skip) fail the last check."""
        alive = step < 0
        if not alive.any():
            return
        size = self.config.crop_size
        unique, inverse = np.unique(image, return_inverse=True)
        sizes = np.array([self.shapes.get(int(v), (0, 0)) for v in unique]).reshape(-1, 2)
        top = np.floor(np.where(alive, y, 0) + 0.5).astype(int) - size // 2
        left = np.floor(np.where(alive, x, 0) + 0.5).astype(int) - size // 2
        outside = (top < 0) | (left < 0) | (top + size > sizes[inverse, 0]) \
            | (left + size > sizes[inverse, 1])
        step[alive & outside] = len(self.segments.reasons) - 1

    def _keep(self, keep, chunk, image, obj_numbers, x, y, at, join, joined) -> None:
        """The surviving cells of a chunk: counted, and their values appended to a segment."""
        kept_at = at[keep]
        rec = np.zeros(len(keep), dtype=CELL_DTYPE)
        rec["image"], rec["object"] = image[keep], obj_numbers[keep]
        rec["x"], rec["y"] = x[keep], y[keep]
        rec["group"] = self.sets["group_codes"][kept_at]
        rec["treatment"] = self.sets["treatment_codes"][kept_at]
        numbers, firsts, counts = np.unique(image[keep], return_index=True, return_counts=True)
        for number, i, count in zip(numbers.tolist(), firsts.tolist(), counts.tolist()):
            entry = self.images.setdefault(number, [0, self.segments.kept + i,
                                                    int(rec["group"][i]),
                                                    int(rec["treatment"][i])])
            entry[0] += count
            key = (entry[2], entry[3])
            self.per_group_treatment[key] = self.per_group_treatment.get(key, 0) + count
        values = np.full((len(keep), len(self.inputs["names"])), np.nan, dtype=np.float32)
        values[:, join.places] = chunk[join.features].to_numpy(dtype=np.float32)[keep]
        for match, right, features, places in joined:
            values[:, places] = right[features].to_numpy(dtype=np.float32)[match[keep]]
        self.segments.add(values, rec)


def plan_cellprofiler(config, work: Path, image_settings, watermark: Watermark) -> dict:
    """Pass 1 for an ExportToSpreadsheet folder; returns the plan's per-image-set summary."""
    inputs = _cellprofiler_inputs(config, image_settings)
    sets = _image_sets(config, inputs)
    segments = _Segments(work, _cellprofiler_reasons(config, inputs["treatment_columns"]))
    cells = _CellProfilerPass(config, inputs, sets, segments)
    cells.run(_ObjectJoin(config, inputs, watermark))
    return {"segments": segments, "names": inputs["names"],
            "dropped": inputs["selection"].dropped, "compartments": list(config.objects),
            "measured_as": inputs["measured_as"],
            "treatment_columns": inputs["treatment_columns"], "split_by": inputs["split_by"],
            "group_names": sets["group_names"], "treatment_names": sets["treatment_names"],
            "images": cells.images, "per_group_treatment": cells.per_group_treatment,
            "shapes": cells.shapes, "depths": cells.depths, "paths": inputs["paths"],
            "illum_paths": sets["illum_paths"], "image_keys": sets["image_keys"],
            "image_df": inputs["image_df"], "image_info": inputs["image_info"],
            "meta_cols": inputs["meta_cols"], "source": inputs["source"],
            "sources": [inputs["image_csv"]] + [path for _, path in inputs["tables"]]}


def _codes(values, names: list, codes: dict) -> np.ndarray:
    """Codes of `values` in `names` (new values appended), vectorised over a chunk."""
    local, uniques = pd.factorize(pd.Series(values, dtype=object))
    mapping = np.empty(len(uniques), dtype=np.int32)
    for i, value in enumerate(uniques):
        value = str(value)
        if value not in codes:
            codes[value] = len(names)
            names.append(value)
        mapping[i] = codes[value]
    return mapping[local]


def _field_header(number: int, field_paths: list, config) -> tuple[tuple, list[str]]:
    """((Y, X), [dtype per channel]) of one field from its TIFF headers; every channel must
    exist and have the same size."""
    field_shapes, dtypes = {}, []
    for ch, path in zip(config.channels, field_paths):
        if not os.path.exists(path):
            raise UserInputError(f"{path}: image file not found (channel {ch}, ImageNumber "
                                 f"{number}). Check PathName_{ch} in Image.csv, "
                                 "or run from the folder its relative paths start from.")
        field_shapes[ch], dtype = cp.image_header(path)
        dtypes.append(dtype)
    distinct = set(field_shapes.values())
    if len(distinct) > 1:
        listed = "; ".join(f"{ch} {s[1]}x{s[0]} ({p})" for (ch, s), p in
                           zip(field_shapes.items(), field_paths))
        raise UserInputError(f"ImageNumber {number}: channel images differ in size: "
                             f"{listed}. Every channel of a field must have the same size.")
    shape = distinct.pop()
    if len(shape) != 2:
        raise UserInputError(f"{field_paths[0]}: expected a 2-D image, found shape {shape}.")
    if config.crop_size > min(shape):
        raise UserInputError(f"--crop-size {config.crop_size}: larger than the images "
                             f"({shape[1]}x{shape[0]} px, {field_paths[0]}). Choose a smaller crop.")
    return tuple(int(v) for v in shape), dtypes


def _check_illum(number, at, illum_paths, shapes, checked, config) -> None:
    """Each illumination function read once, when first named: a wrong one fails before work."""
    for ch in config.illum or {}:
        path = illum_paths[ch][at]
        if path in checked:
            continue
        checked.add(path)
        function = ms.load_illumination(path)
        if function.shape != tuple(shapes[number]):
            raise UserInputError(
                f"{path}: the illumination function is {function.shape[1]}x"
                f"{function.shape[0]} px but the {ch} images are {shapes[number][1]}x"
                f"{shapes[number][0]} (ImageNumber {number}); --illum must name the "
                "function made for them.")


def _crop_column(config, path: Path, header) -> str:
    """The column of crop files: --crop-column, else the first of CROP_COLUMN_CANDIDATES."""
    column = config.crop_column or next((c for c in cp.CROP_COLUMN_CANDIDATES if c in header),
                                        None)
    if column is None or column not in header:
        raise UserInputError(
            f"{path}: no crop file column {column or '(tried ' + ', '.join(cp.CROP_COLUMN_CANDIDATES) + ')'}; "
            "name the column of crop files with --crop-column.")
    return column


def _table_inputs(config) -> dict:
    """What pass 1 of a single-cell table reads before any row: its columns, the candidate
    features, the measured images, the treatment, grouping and metadata columns."""
    path = Path(config.input)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file. With --table, INPUT is a single-cell "
                             "CSV or Parquet file.")
    header = streaming.table_columns(path)
    column = _crop_column(config, path, header)
    columns = [c for c in header if c != column] + ["ImageNumber", "ObjectNumber"]
    compartments = cp.table_compartments(columns + ["_crop_path", "_cell_id"])
    measured_as = ms.pair_channels(config.channels, ms.measured_images(
        columns + ["_crop_path", "_cell_id"]), config.measured_as, path)
    selection = _candidates([c for c in columns if not c.startswith("_")], compartments, config,
                            path)
    names = selection.names
    treatment_cols = pick_column(columns, config.treatment_column, TREATMENT_CANDIDATES,
                                 "--treatment-column", path)
    split_by = config.split_by
    if not split_by:
        if "Metadata_ImageNumber" not in header:
            raise UserInputError(f"{path}: no Metadata_ImageNumber column to keep fields together "
                                 "across splits; name the grouping column(s) with --split-by.")
        split_by = ["Metadata_ImageNumber"]
    missing = [c for c in split_by if c not in columns]
    if missing:
        group_keys(pd.DataFrame(columns=columns), split_by, path)  # raises the clear error
    meta_cols = [c for c in header if c.startswith("Metadata_") and c not in treatment_cols]
    text = [c for c in dict.fromkeys([column] + treatment_cols + split_by + meta_cols
                                     + [c for c in ("Metadata_ImageNumber",
                                                    "Metadata_ObjectNumber") if c in header])
            if c not in names and c in header]
    numeric = [c for c in names if c in header]
    kinds = streaming.csv_text_kinds(path, [c for c in text if c != column], config.chunk_rows)
    return {"path": path, "column": column, "compartments": compartments,
            "measured_as": measured_as, "selection": selection, "names": names,
            "treatment_columns": treatment_cols, "split_by": split_by, "meta_cols": meta_cols,
            "text": text, "numeric": numeric, "kinds": kinds}


def _table_ids(chunk: pd.DataFrame, start: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(ImageNumbers, ObjectNumbers, cell ids) of a table chunk's rows: its Metadata_ columns
    where it has them, else image 0 and the row number."""
    n = len(chunk)
    rows = np.arange(start, start + n)
    image = chunk["Metadata_ImageNumber"].to_numpy() if "Metadata_ImageNumber" in chunk \
        else np.zeros(n, dtype=np.int64)
    obj = chunk["Metadata_ObjectNumber"].to_numpy() if "Metadata_ObjectNumber" in chunk \
        else rows + 1
    cell_ids = ([f"{a}-{b}" for a, b in zip(pd.Series(image).astype(str),
                                             pd.Series(obj).astype(str))]
                if "Metadata_ObjectNumber" in chunk else rows.astype(str).tolist())
    return image, obj, cell_ids


class _TablePass:
    """Pass 1 over a single-cell table: rows without a crop file or a treatment rejected, the
    others appended to segments with their cell ids and crop files; per treatment, the values
    of each Metadata_ column (to find those with one value per treatment)."""

    def __init__(self, config, inputs, segments: _Segments):
        self.config, self.inputs, self.segments = config, inputs, segments
        self.base = inputs["path"].resolve().parent
        self.group_names, self.group_code = [], {}
        self.treatment_names, self.treatment_code = [], {}
        self.per_group_treatment = {}
        self.metadata = {c: {"missing": False, "values": {}} for c in inputs["meta_cols"]}

    def run(self, watermark: Watermark) -> None:
        inputs = self.inputs
        for start, chunk in streaming.iter_chunks(inputs["path"], inputs["numeric"],
                                                  inputs["text"], self.config.chunk_rows,
                                                  inputs["kinds"],
                                                  features={n: n for n in inputs["numeric"]}):
            watermark.hold(len(chunk))
            image, obj, cell_ids = _table_ids(chunk, start)
            crop = chunk[inputs["column"]].to_numpy(dtype=object)
            step = np.where(pd.isna(crop), 0, -1)
            if inputs["treatment_columns"]:
                no_value = chunk[inputs["treatment_columns"]].astype("string").isna() \
                    .any(axis=1).to_numpy()
                step[(step < 0) & no_value] = 1
            for k in range(len(self.segments.reasons)):
                at = np.flatnonzero(step == k)
                self.segments.reject(k, [cell_ids[i] for i in at], image[at].tolist(),
                                     obj[at].tolist())
            keep = np.flatnonzero(step < 0)
            if len(keep):
                self._keep(keep, chunk.iloc[keep], image, obj, cell_ids, crop)

    def _keep(self, keep, kept, image, obj, cell_ids, crop) -> None:
        inputs = self.inputs
        if inputs["treatment_columns"]:
            treatment = _treatment_text(kept, inputs["treatment_columns"])
        else:
            treatment = pd.Series([""] * len(kept))
        groups = group_keys(kept, inputs["split_by"], inputs["path"]).to_numpy()
        treatment = treatment.to_numpy()
        self._note_metadata(kept, treatment)
        rec = np.zeros(len(keep), dtype=CELL_DTYPE)
        rec["image"] = pd.to_numeric(pd.Series(image[keep])).to_numpy(dtype=np.float64)
        rec["object"] = pd.to_numeric(pd.Series(obj[keep])).to_numpy(dtype=np.float64)
        rec["group"] = _codes(groups, self.group_names, self.group_code)
        rec["treatment"] = _codes(treatment, self.treatment_names, self.treatment_code)
        pairs, counts = np.unique(np.stack([rec["group"], rec["treatment"]]), axis=1,
                                  return_counts=True)
        for key, count in zip(map(tuple, pairs.T.tolist()), counts.tolist()):
            self.per_group_treatment[key] = self.per_group_treatment.get(key, 0) + count
        crops = [os.path.normpath(str(p) if os.path.isabs(str(p)) else str(self.base / str(p)))
                 for p in crop[keep]]
        names = inputs["names"]
        values = kept[names].to_numpy(dtype=np.float32) if names else np.zeros((len(keep), 0))
        self.segments.add(values, rec, {"cell_id": [cell_ids[i] for i in keep], "crop": crops})

    def _note_metadata(self, kept, treatment) -> None:
        """Up to two values of each Metadata_ column per treatment (two: not one per treatment)."""
        for c in self.inputs["meta_cols"]:
            values = kept[c].astype("string")
            state = self.metadata[c]
            if values.isna().any():
                state["missing"] = True
                continue
            for t, v in zip(treatment, values):
                seen = state["values"].setdefault(str(t), [])
                if v not in seen and len(seen) < 2:
                    seen.append(v)

    def treatment_metadata(self) -> dict:
        """{column: {treatment: value}} of the Metadata_ columns with one value per treatment."""
        found = {}
        for c in self.inputs["meta_cols"]:
            state = self.metadata[c]
            if state["missing"] or not state["values"]:
                continue
            if all(len(v) == 1 for v in state["values"].values()):
                found[c] = {t: str(state["values"][t][0]) for t in sorted(state["values"])}
        return found


def plan_table(config, work: Path, watermark: Watermark) -> dict:
    """Pass 1 for a single-cell table (CytoTable/pycytominer) with a crop file per cell."""
    inputs = _table_inputs(config)
    reasons = ["no crop file", f"no value in {','.join(inputs['treatment_columns'])}"]
    segments = _Segments(work, reasons)
    cells = _TablePass(config, inputs, segments)
    cells.run(watermark)
    return {"segments": segments, "names": inputs["names"],
            "dropped": inputs["selection"].dropped, "compartments": inputs["compartments"],
            "measured_as": inputs["measured_as"],
            "treatment_columns": inputs["treatment_columns"], "split_by": inputs["split_by"],
            "group_names": cells.group_names, "treatment_names": cells.treatment_names,
            "per_group_treatment": cells.per_group_treatment,
            "treatment_metadata": cells.treatment_metadata(), "source": inputs["path"],
            "sources": [inputs["path"]]}


# ---------------------------------------------------------------------------
# Pass 2: splits, features, shards


def segment_cells(work: Path, k: int) -> np.ndarray:
    return np.load(work / f"seg-{k:05d}.cells.npy")


def training_ranges(work: Path, sizes: list, train_groups: np.ndarray) -> dict:
    """Per candidate feature over the training split's cells: any finite value, min, max and
    the first finite value (in row order): what decides "all-NaN" and "constant"."""
    found = first = low = high = None
    for k in range(len(sizes)):
        cells = segment_cells(work, k)
        train = train_groups[cells["group"]]
        if not train.any():
            continue
        values = np.load(work / f"seg-{k:05d}.values.npy", mmap_mode="r")[np.flatnonzero(train)]
        finite = np.isfinite(values)
        if found is None:
            n = values.shape[1]
            found = np.zeros(n, dtype=bool)
            first = np.full(n, np.nan, dtype=np.float32)
            low = np.full(n, np.inf, dtype=np.float32)
            high = np.full(n, -np.inf, dtype=np.float32)
        present = finite.any(axis=0)
        new = present & ~found
        if new.any():
            rows = np.argmax(finite[:, new], axis=0)
            first[new] = values[rows, np.flatnonzero(new)]
        found |= present
        # Non-finite values replaced by +-inf leave no NaN: min and max, not nanmin and nanmax.
        low = np.fmin(low, np.where(finite, values, np.inf).min(axis=0))
        high = np.fmax(high, np.where(finite, values, -np.inf).max(axis=0))
    return {"found": found, "first": first, "low": low, "high": high}


def uninformative(names, ranges) -> tuple[list[int], list[dict]]:
    """drop_uninformative's answer from training_ranges."""
    keep, dropped = [], []
    for j, name in enumerate(names):
        if ranges["found"] is None or not ranges["found"][j]:
            dropped.append({"name": name, "reason": "no finite value in the training split"})
        elif ranges["low"][j] == ranges["high"][j]:
            dropped.append({"name": name,
                            "reason": f"constant ({ranges['first'][j]:g}) in the training split"})
        else:
            keep.append(j)
    return keep, dropped


def cellprofiler_shards(images: dict, split_of_image, treatment_of_image, shard_size: int):
    """Shards of whole fields, per split and treatment, in ImageNumber order (as many cells as
    shard_size allows, unless one field has more)."""
    shards = []
    for split in SPLITS:
        split_shards = []
        per_treatment = {}
        for number in sorted(images):
            if split_of_image(number) == split:
                per_treatment.setdefault(treatment_of_image(number), []).append(number)
        for treatment in sorted(per_treatment):
            current, count = [], 0
            for number in per_treatment[treatment]:
                n, start = images[number][:2]
                if current and count + n > shard_size:
                    split_shards.append({"treatment": treatment, "fields": current})
                    current, count = [], 0
                current.append([int(number), int(start), int(start + n)])
                count += n
            if current:
                split_shards.append({"treatment": treatment, "fields": current})
        for i, shard in enumerate(split_shards):
            shard["split"] = split
            shard["file"] = f"{split}-{i:05d}-of-{len(split_shards):05d}.tfrecord"
            shards.append(shard)
    return shards


def table_shards(work: Path, sizes: list, split_codes: np.ndarray, treatment_names: list,
                 shard_size: int):
    """A table's shards: per split and treatment, its cells in row order, shard_size at a time.
    The kept-cell indices of each (split, treatment) go to an order file the shard slices."""
    handles, counts = {}, {}
    offset = 0
    try:
        for k in range(len(sizes)):
            cells = segment_cells(work, k)
            split = split_codes[cells["group"]]
            for key in sorted(set(zip(split.tolist(), cells["treatment"].tolist()))):
                rows = np.flatnonzero((split == key[0]) & (cells["treatment"] == key[1])) + offset
                if key not in handles:
                    handles[key] = open(work / f"order-{key[0]}-{key[1]}.i64", "wb")
                handles[key].write(rows.astype("<i8").tobytes())
                counts[key] = counts.get(key, 0) + len(rows)
            offset += len(cells)
    finally:
        for handle in handles.values():
            handle.close()
    shards = []
    for s, split in enumerate(SPLITS):
        split_shards = []
        for code in sorted(range(len(treatment_names)), key=lambda c: treatment_names[c]):
            total = counts.get((s, code), 0)
            for lo in range(0, total, shard_size):
                split_shards.append({"treatment": treatment_names[code],
                                     "order": [f"order-{s}-{code}.i64", lo,
                                               min(total, lo + shard_size)]})
        for i, shard in enumerate(split_shards):
            shard["split"] = split
            shard["file"] = f"{split}-{i:05d}-of-{len(split_shards):05d}.tfrecord"
            shards.append(shard)
    return shards


def _assign_splits(config, first) -> dict:
    """The --split-by groups' splits, and the cells and groups per split and treatment."""
    group_names, treatment_names = first["group_names"], first["treatment_names"]
    counts, strata = {}, {}
    for (g, t), c in first["per_group_treatment"].items():
        counts[group_names[g]] = counts.get(group_names[g], 0) + c
        strata.setdefault(group_names[g], set()).add(treatment_names[t])
    split_of = assign_group_splits(counts, config.split, config.seed, strata)
    split_codes = np.asarray([SPLITS.index(split_of.get(g, "train")) for g in group_names],
                             dtype=np.int64)
    treatments = sorted({treatment_names[t] for _, t in first["per_group_treatment"]})
    per_treatment = {split: {t: 0 for t in treatments} for split in SPLITS}
    groups_in = {split: set() for split in SPLITS}
    for (g, t), c in first["per_group_treatment"].items():
        split = split_of[group_names[g]]
        per_treatment[split][treatment_names[t]] += c
        groups_in[split].add(g)
    return {"codes": split_codes, "treatments": treatments, "per_treatment": per_treatment,
            "groups": {s: len(groups_in[s]) for s in SPLITS}}


def _sources_and_fingerprint(config, first, names) -> tuple[list, str]:
    """The tables read (size and sha256) and the plan's fingerprint: the options, the tables'
    checksums and the features kept."""
    sources = [{"path": str(p), "bytes": Path(p).stat().st_size, "sha256": sha256_file(p)}
               for p in first["sources"]]
    options = {k: v for k, v in asdict(config).items() if k not in config.RUN_OPTIONS}
    fingerprint = hashlib.sha256(json.dumps(
        [options, [s["sha256"] for s in sources], names],
        sort_keys=True, default=str).encode()).hexdigest()
    return sources, fingerprint


def bit_depths(config, depths: dict) -> dict:
    """{channel: how its files were rescaled} for channels whose files mix 8-bit and 16-bit (as
    plates from two microscopes do): CellProfiler scales each file by its own bit depth, so an
    8-bit file is multiplied by 257 to the 16-bit range (255 -> 65535), as it would measure it.
    Any other mix of kinds in one channel is refused, naming a file of each."""
    rescaled = {}
    for ch in config.channels:
        kinds = depths.get(ch, {})
        if len(kinds) < 2:
            continue
        if set(kinds) != {"uint8", "uint16"}:
            listed = "; ".join(f"{kind} ({path}, ImageNumber {number})"
                               for kind, (_, path, number) in sorted(kinds.items()))
            raise UserInputError(f"channel {ch}: its images are of different kinds: {listed}. "
                                 "Save them as one kind (e.g. 16-bit TIFF) and convert again, "
                                 "or convert each kind separately.")
        rescaled[ch] = {"from": "uint8", "to": "uint16", "factor": 257,
                        "fields": kinds["uint8"][0],
                        "of": kinds["uint8"][0] + kinds["uint16"][0]}
    return rescaled


def _cellprofiler_plan(config, first, split_codes) -> dict:
    """The plan's parts that only an ExportToSpreadsheet folder has: shards of whole fields,
    how CellProfiler saw the images, each field's files and size."""
    images, treatment_names = first["images"], first["treatment_names"]
    group_names = first["group_names"]
    image_row = {n: i for i, n in enumerate(first["image_keys"])}
    split_of_image = {n: SPLITS[split_codes[e[2]]] for n, e in images.items()}
    shards = cellprofiler_shards(images, split_of_image.get,
                                 lambda n: treatment_names[images[n][3]], config.shard_size)
    train_images = {n for n, s in split_of_image.items() if s == "train"}
    image_info = first["image_info"]
    rescaled = bit_depths(config, first["depths"])
    cellprofiler = {
        "illumination": dict(config.illum or {}),
        "illumination_functions": image_info.attrs["illumination_functions"],
        # A channel of mixed bit depths: each file by its own depth, not one median Scaling_.
        "scaling": {ch: None if ch in rescaled else ms.scaling_of(image_info, ch)
                    for ch in config.channels},
        "thresholds": ms.object_thresholds(image_info, config.objects, train_images)}
    in_order = sorted(images, key=lambda n: images[n][1])
    with_cells = first["image_df"].iloc[[image_row[n] for n in in_order]].assign(
        _treatment=[treatment_names[images[n][3]] for n in in_order])
    fields = {str(n): {"paths": [first["paths"][ch][image_row[n]] for ch in config.channels],
                       "shape": list(first["shapes"][n]),
                       "group": group_names[images[n][2]],
                       "illum": [first["illum_paths"][ch][image_row[n]]
                                 if ch in (config.illum or {}) else None
                                 for ch in config.channels] if config.illum else None}
              for n in images}
    plan = {"shards": shards, "cellprofiler": cellprofiler,
            "treatment_metadata": per_treatment_columns(with_cells, first["treatment_columns"]),
            "fields": fields}
    if rescaled:
        plan["rescaled"] = rescaled
    return plan


def make_plan(config, work: Path, image_settings, progress: bool = False,
              watermark: Watermark | None = None) -> dict:
    """Both passes into `work` (a new folder); returns the plan (also written as plan.json)."""
    started = time.perf_counter()
    watermark = watermark or Watermark()
    first = plan_table(config, work, watermark) if config.table else \
        plan_cellprofiler(config, work, image_settings, watermark)
    segments = first["segments"]
    segments.close_rejects()
    source = first["source"]
    if segments.kept == 0:
        rejected = sum(segments.reject_counts)
        raise UserInputError(f"{source}: no cell left to convert ({rejected} rejected; "
                             f"first reason: {segments.first_reason()}).")
    splits = _assign_splits(config, first)
    ranges = training_ranges(work, segments.sizes, splits["codes"] == 0)
    keep, dropped = uninformative(first["names"], ranges)
    if not keep:
        raise UserInputError(f"{source}: every selected feature is all-NaN or constant in the "
                             "training split; nothing to learn from.")
    names = [first["names"][j] for j in keep]
    sources, fingerprint = _sources_and_fingerprint(config, first, names)
    per_treatment = splits["per_treatment"]
    plan = {
        "fingerprint": fingerprint, "chunk_rows": config.chunk_rows,
        "source": str(source), "compartments": first["compartments"],
        "measured_as": first["measured_as"], "names": names,
        "keep": keep, "candidates": len(first["names"]),
        "dropped": first["dropped"] + dropped,
        "treatments": splits["treatments"], "treatment_columns": first["treatment_columns"],
        "split_by": first["split_by"], "segments": segments.sizes,
        "counts": {"cells": int(segments.kept),
                   "splits": {s: sum(per_treatment[s].values()) for s in SPLITS},
                   "treatments": per_treatment},
        "groups": splits["groups"],
        "rejects": {"count": int(sum(segments.reject_counts)),
                    "by_reason": segments.by_reason()},
        "sources": sources,
        "peak_rows": watermark.peak,
    }
    if config.table:
        plan["treatment_metadata"] = first["treatment_metadata"]
        plan["cellprofiler"] = {}
        plan["shards"] = table_shards(work, segments.sizes, splits["codes"],
                                      first["treatment_names"], config.shard_size)
    else:
        plan.update(_cellprofiler_plan(config, first, splits["codes"]))
    plan["seconds"] = round(time.perf_counter() - started, 3)
    write_json(work / GROUPS, first["group_names"])
    write_json(work / SEGMENTS, segments.sizes)
    write_json(work / PLAN, plan)
    return plan


@functools.lru_cache(maxsize=4)
def group_names(work) -> list:
    """The --split-by group names that segments' group codes index (read once per process)."""
    return json.loads((Path(work) / GROUPS).read_text())


@functools.lru_cache(maxsize=4)
def segment_sizes(work) -> list:
    return json.loads((Path(work) / SEGMENTS).read_text())


def per_treatment_columns(cells: pd.DataFrame, treatment_cols) -> dict:
    """Metadata_* columns holding one value per treatment (e.g. Metadata_MoA), as
    {column: {treatment: value}}: what evaluate's --moa-column reads."""
    found = {}
    for col in cells.columns:
        if not col.startswith("Metadata_") or col in (treatment_cols or []):
            continue
        values = cells[col].astype("string")
        if values.isna().any():
            continue
        per = values.groupby(cells["_treatment"].to_numpy()).agg(["nunique", "first"])
        if (per["nunique"] == 1).all():
            found[col] = {str(t): str(v) for t, v in per["first"].items()}
    return found


def rows_of(work: Path, sizes: list, ranges, opened: dict | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(values [n, F], cells [n], text {name: [n]}) of the kept cells at `ranges` (a list of
    [start, stop) kept-cell indices, in order), read from the segments; `opened` keeps the
    segments memory-mapped between calls (a shard's fields are mostly in one segment)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    opened = {} if opened is None else opened
    values, cells, text = [], [], {}
    for start, stop in ranges:
        k = int(np.searchsorted(offsets, start, side="right") - 1)
        while start < stop:
            lo, hi = start - offsets[k], min(stop, offsets[k + 1]) - offsets[k]
            if k not in opened:
                opened[k] = {name: np.load(path, mmap_mode="r") for name, path in
                             ((n, work / f"seg-{k:05d}.{n}.npy")
                              for n in ("values", "cells", "cell_id", "crop")) if path.exists()}
            segment = opened[k]
            values.append(segment["values"][lo:hi])
            cells.append(segment["cells"][lo:hi])
            for name in ("cell_id", "crop"):
                if name in segment:
                    text.setdefault(name, []).extend(segment[name][lo:hi].tolist())
            start = offsets[k] + hi
            k += 1
    return np.concatenate(values), np.concatenate(cells), text


def order_ranges(work: Path, order) -> list:
    """[start, stop) runs of the kept-cell indices a table shard's order slice lists."""
    name, lo, hi = order
    rows = np.fromfile(work / name, dtype="<i8", count=hi - lo, offset=8 * lo)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(rows, breaks)]
