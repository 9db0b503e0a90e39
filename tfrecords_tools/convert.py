"""convert: CellProfiler outputs + images -> sharded TFRecords of (features, crop) + manifest.

Plan, then write. The plan (which cells, which features, which split, which
shard) is made from the tables and image headers alone; each shard is then one
independent part: it reads its fields once each, cuts its crops and writes
`<split>-<i>-of-<n>.tfrecord` under a temporary name, renamed when complete.
Completed parts leave a summary in `.parts/` (checksums, counts, pixel
histogram; for training shards the features' moments and sorted values) so
that an interrupted run picks up where it stopped, verifying completed parts
by checksum. The manifest is written last, from the part summaries alone:
pixel ranges from the merged histograms, feature statistics merged from the
parts (`tfrecords_tools.features.statistics_from_parts`: moments by Chan's
formula in part order, median and MAD exactly).

Every way of running gives the same dataset: one process, a process pool
(`workers`), Dask (`scheduler`: "local" or an address, see
`tfrecords_tools.parts`), or `part=(I, N)` runs of the I-th of N groups of
shards followed by one `finalize=True` run (a Slurm array, Nextflow).

Shards are treatment-pure (one treatment per shard), so that the reader can
draw treatment-balanced batches without reading anything twice.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools import cellprofiler as cp
from tfrecords_tools import locks
from tfrecords_tools import measured as ms
from tfrecords_tools import planning
from tfrecords_tools.measured import dtype_max
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import part_moments, sorted_part_values, statistics_from_parts
from tfrecords_tools._version import __version__
from tfrecords_tools.atomic import STALE_SECONDS, partial_path, pid_alive, write_json
from tfrecords_tools.manifest import MANIFEST, SCHEMA_VERSION, sha256_file
from tfrecords_tools.parts import (PARTS, check_options, client_for, parse_part, part_label,
                                   run_parts, select_part, verify_part, write_partition)
from tfrecords_tools.records import encode_examples
from tfrecords_tools.stages import StageTimer
from tfrecords_tools.tfrecord_io import TFRecordWriter
from tfrecords_tools.splits import parse_fractions
from tfrecords_tools.streaming import CHUNK_ROWS

REJECTS = "rejects.csv"


@dataclass
class ConvertConfig:
    """Everything that decides the dataset; saved in the manifest."""
    input: str
    out_dir: str
    channels: list[str]
    objects: list[str] = field(default_factory=lambda: ["Nuclei"])
    table: bool = False
    crop_column: str | None = None
    crop_size: int = 68
    edge: str = "skip"
    include: str | None = None
    exclude: str | None = None
    features_file: str | None = None
    split_by: list[str] | None = None
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    treatment_column: list[str] | None = None
    shard_size: int = 1000
    compression: str = ""
    intensity_percentile: float = 99.99
    workers: int = 1
    overwrite: bool = False
    scheduler: str | None = None  # None: this machine; "local": a LocalCluster; or an address
    measured_as: dict | None = None  # channel -> the image its features were measured on
    illum: dict | None = None  # channel -> Image.csv's name of its illumination function
    chunk_rows: int = CHUNK_ROWS  # table rows read at a time while planning

    # How a run executes, not what it makes: left out of the manifest.
    RUN_OPTIONS = ("workers", "overwrite", "scheduler", "chunk_rows")

    def validate(self) -> None:
        if not self.channels:
            raise UserInputError("--channels: name at least one channel, e.g. DNA,Tubulin,Actin.")
        if len(set(self.channels)) != len(self.channels):
            raise UserInputError(f"--channels {','.join(self.channels)}: a channel is named twice.")
        if self.crop_size < 8:
            raise UserInputError(f"--crop-size {self.crop_size}: use at least 8 pixels.")
        if self.edge not in ("skip", "pad"):
            raise UserInputError(f"--edge {self.edge}: choose skip or pad.")
        if self.shard_size < 1:
            raise UserInputError(f"--shard-size {self.shard_size}: must be at least 1.")
        if self.compression not in ("", "GZIP"):
            raise UserInputError(f"--compression {self.compression}: choose none or GZIP.")
        if not 50 <= self.intensity_percentile <= 100:
            raise UserInputError(f"--intensity-percentile {self.intensity_percentile}: "
                                 "use a value between 50 and 100.")
        self.split = parse_fractions(self.split)
        self.measured_as = ms.parse_map(self.measured_as, "--measured-as") or None
        self.illum = ms.parse_map(self.illum, "--illum") or None
        if self.illum:
            if self.table:
                raise UserInputError("--illum: with --table the crops are files of their own; "
                                     "correct them before converting, or convert the "
                                     "ExportToSpreadsheet folder instead.")
            unknown = [k for k in self.illum if k not in self.channels]
            if unknown:
                raise UserInputError(f"--illum: {', '.join(unknown)} is not one of --channels "
                                     f"({', '.join(self.channels)}).")
        if self.workers < 1:
            raise UserInputError(f"--workers {self.workers}: must be at least 1.")
        if self.chunk_rows < 1:
            raise UserInputError(f"--chunk-rows {self.chunk_rows}: must be at least 1.")


# ---------------------------------------------------------------------------
# Planning (tfrecords_tools.planning streams the tables; this module writes)


def plan_dataset(config: ConvertConfig, work: Path, progress: bool = False,
                 watermark=None) -> dict:
    """Everything decided before any pixel is read (cells, features, splits, shards, rejects),
    made from the tables a chunk at a time into the new folder `work`; see planning."""
    config.validate()
    return planning.make_plan(config, Path(work), image_settings, progress, watermark)


def image_settings(image_csv, config: ConvertConfig) -> pd.DataFrame:
    """The Image table's columns that say how CellProfiler saw each image set: ImageNumber,
    Scaling_<channel>, Threshold_FinalThreshold_<object> and, with --illum, each illumination
    function's path as `_illum_<channel>`."""
    header = cp.read_table(image_csv).columns if str(image_csv).endswith(".parquet") else \
        pd.read_csv(image_csv, nrows=0).columns
    wanted = ["ImageNumber"] + [c for c in header if c in
                                {f"Scaling_{ch}" for ch in config.channels}
                                | {f"Threshold_FinalThreshold_{o}" for o in config.objects}]
    for ch, name in (config.illum or {}).items():
        pair = [f"FileName_{name}", f"PathName_{name}"]
        if not set(pair) <= set(header):
            listed = ", ".join(c[len("FileName_"):] for c in header
                               if c.startswith("FileName_Illum")) or "none"
            raise UserInputError(f"--illum {ch}={name}: {image_csv} has no {pair[0]} / {pair[1]} "
                                 f"columns. Illumination functions it names: {listed}.")
        wanted += pair
    table = cp.read_table(image_csv, columns=list(dict.fromkeys(wanted)))
    for ch, name in (config.illum or {}).items():
        table[f"_illum_{ch}"] = cp.channel_paths(table, name, image_csv)
    table.attrs["illumination_functions"] = [c[len("FileName_"):] for c in header
                                             if c.lower().startswith("filename_illum")]
    return table


# ---------------------------------------------------------------------------
# Writing one shard (a part): runs in a worker process


def cut_crop(stack: np.ndarray, x: float, y: float, size: int, edge: str):
    """A size x size crop of an (H, W, C) stack centred on pixel (round(y), round(x)).

    Rounding is half-up. With edge='pad' the outside of the field is zeros.
    Returns None when the crop would leave the field and edge='skip'.
    """
    height, width = stack.shape[:2]
    top = int(np.floor(y + 0.5)) - size // 2
    left = int(np.floor(x + 0.5)) - size // 2
    if 0 <= top and 0 <= left and top + size <= height and left + size <= width:
        return stack[top:top + size, left:left + size]
    if edge == "skip":
        return None
    crop = np.zeros((size, size, stack.shape[2]), dtype=stack.dtype)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + size, height), min(left + size, width)
    if t0 < t1 and l0 < l1:
        crop[t0 - top:t1 - top, l0 - left:l1 - left] = stack[t0:t1, l0:l1]
    return crop


def cut_crops(stack, xs, ys, size: int, edge: str) -> np.ndarray:
    """cut_crop for every centre (xs[i], ys[i]) of one field, into one [n, size, size, C]
    array. `stack`: the field as an (H, W, C) array or as its C planes (H, W), which spares
    stacking the whole field. The planner has already rejected the cells whose crop would leave
    the field when edge='skip'."""
    planes = [stack[..., c] for c in range(stack.shape[2])] if isinstance(stack, np.ndarray) \
        else list(stack)
    height, width = planes[0].shape
    tops = np.floor(np.asarray(ys, dtype=np.float64) + 0.5).astype(np.int64) - size // 2
    lefts = np.floor(np.asarray(xs, dtype=np.float64) + 0.5).astype(np.int64) - size // 2
    crops = np.empty((len(tops), size, size, len(planes)), dtype=planes[0].dtype)
    inside = (tops >= 0) & (lefts >= 0) & (tops + size <= height) & (lefts + size <= width)
    whole = None
    for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
        if inside[i]:
            for c, plane in enumerate(planes):
                crops[i, :, :, c] = plane[top:top + size, left:left + size]
            continue
        whole = np.stack(planes, axis=-1) if whole is None else whole
        crop = cut_crop(whole, xs[i], ys[i], size, edge)
        if crop is None:
            raise ValueError(f"a crop at ({xs[i]}, {ys[i]}) leaves the field (edge='skip')")
        crops[i] = crop
    return crops


def fit_table_crop(crop: np.ndarray, n_channels: int, size: int, path: str) -> np.ndarray:
    """A crop file as (size, size, C): CHW is transposed, larger crops centre-cut."""
    if crop.ndim == 2 and n_channels == 1:
        crop = crop[..., None]
    if crop.ndim != 3:
        raise UserInputError(f"{path}: a crop must be H x W x C, found shape {crop.shape}.")
    if crop.shape[-1] != n_channels and crop.shape[0] == n_channels:
        crop = np.moveaxis(crop, 0, -1)
    if crop.shape[-1] != n_channels:
        raise UserInputError(f"{path}: crop has shape {crop.shape}, expected {n_channels} channels "
                             "(one per --channels name).")
    h, w = crop.shape[:2]
    if h < size or w < size:
        raise UserInputError(f"{path}: crop is {w}x{h} px, smaller than --crop-size {size}.")
    top, left = (h - size) // 2, (w - size) // 2
    return crop[top:top + size, left:left + size]


def histogram_bins(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        return 1 << (8 * dtype.itemsize)
    return 65536


def pixel_histogram(crops: np.ndarray, bins: int) -> np.ndarray:
    """Per-channel histogram of crop pixels: exact counts per integer value for 8/16-bit
    data, 65536 bins over [0, 1] otherwise (values outside go to the end bins)."""
    channels = crops.shape[-1]
    hist = np.zeros((channels, bins), dtype=np.int64)
    exact = crops.dtype.kind in "ui" and crops.dtype.itemsize <= 2
    for c in range(channels):
        values = crops[..., c].ravel()
        if exact and crops.dtype.kind == "u":  # every value is a bin already (bincount
            hist[c] = np.bincount(values.astype(np.intp), minlength=bins)  # is faster on intp)
            continue
        if exact:
            index = np.clip(values.astype(np.int64), 0, bins - 1)
        else:
            index = np.clip((values.astype(np.float64) * (bins - 1)).round(), 0, bins - 1)
        hist[c] = np.bincount(index.astype(np.int64), minlength=bins)
    return hist


def fetch(path: str, timer: StageTimer | None = None) -> tuple[bytes, dict]:
    """A file's bytes, with its size and sha256: the part of reading an image that releases the
    GIL (the file read and the hash), so that _ReadAhead can do it in a thread."""
    timer = timer or StageTimer()
    try:
        with timer.stage("read"), open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:  # e.g. a worker of a cluster that does not see the file system
        raise UserInputError(f"{path}: cannot be read here ({err.strerror or err}; host "
                             f"{_host()}). Every worker must see the input files at the same "
                             "paths (a shared file system).") from None
    with timer.stage("checksum"):
        return data, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_array(path: str, timer: StageTimer | None = None, fetched: tuple | None = None):
    """A TIFF or .npy file as an array, read once, with the file's size and sha256.
    `fetched`: what fetch(path) gave, if the file was read already (by _ReadAhead)."""
    timer = timer or StageTimer()
    data, info = fetched if fetched is not None else fetch(path, timer)
    try:
        with timer.stage("read"):
            if path.endswith(".npy"):
                return np.load(io.BytesIO(data)), info
            import tifffile
            return tifffile.imread(io.BytesIO(data)), info
    except Exception as err:
        raise UserInputError(f"{path}: cannot be read as an image ({err}). {cp.DAMAGED_IMAGE}") from None


@functools.lru_cache(maxsize=8)
def _illumination(path: str) -> np.ndarray:
    """An illumination function, read once per process (one file serves many fields)."""
    return ms.load_illumination(path)


@functools.lru_cache(maxsize=64)
def _file_info(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _host() -> str:
    import socket

    return socket.gethostname()


def read_field(paths: list[str], illum: list | None = None, scaling: list | None = None,
               rescale: list | None = None, timer: StageTimer | None = None):
    """The channels of one field as an (H, W, C) stack, with each file's size and sha256.

    With `scaling` (a list, one entry per channel: CellProfiler's scale or None for the bit
    depth), every channel is divided by it and, where `illum` names a file, by that
    illumination function: float32, as CellProfiler measured the image. Else `rescale` (one
    entry per channel: true for a channel of mixed bit depths) brings an 8-bit file of such a
    channel to the 16-bit range (x257: 255 -> 65535, as CellProfiler scales each file)."""
    planes, files = read_planes(paths, illum, scaling, rescale, timer)
    return np.stack(planes, axis=-1), files


def read_planes(paths: list[str], illum: list | None = None, scaling: list | None = None,
                rescale: list | None = None, timer: StageTimer | None = None,
                fetched: dict | None = None):
    """read_field's channels as a list of (H, W) planes of one dtype, not stacked.
    `fetched`: {path: fetch(path)} for files read already."""
    timer = timer or StageTimer()
    planes, files, fetched = [], {}, fetched or {}
    for k, path in enumerate(paths):
        plane, files[path] = read_array(path, timer, fetched.get(path))
        with timer.stage("scale"):
            if plane.ndim == 3 and 1 in (plane.shape[0], plane.shape[-1]):
                plane = np.squeeze(plane)
            if scaling is None and rescale and rescale[k] and plane.dtype == np.uint8:
                plane = plane.astype(np.uint16) * np.uint16(257)
            if scaling is not None:
                function = illum[k] if illum else None
                if function:
                    files[function] = _file_info(function)
                plane = ms.correct(plane, ms.full_scale(plane.dtype, scaling[k]),
                                   _illumination(function) if function else None, path)
        planes.append(plane)
    with timer.stage("scale"):
        dtype = np.result_type(*[p.dtype for p in planes])
        return [p.astype(dtype, copy=False) for p in planes], files


def shard_cells(task: dict):
    """The fields of one shard, each with its cells as one batch of columns: cell_id, group
    (lists), image_number, object_number (arrays), features [n, F] (C order: the training
    moments' sums depend on it) and, for a field, the
    centres x and y, for a table's cells each one's crop file (crop_path). Read from the
    plan's segments."""
    work = Path(task["plan_dir"])
    keep = np.asarray(task["keep"], dtype=np.int64)
    sizes = planning.segment_sizes(str(work))
    opened = {}
    if task["table"]:
        groups = planning.group_names(str(work))
        values, cells, text = planning.rows_of(work, sizes,
                                               planning.order_ranges(work, task["order"]), opened)
        # Cells of a shard go in ImageNumber order (stable), as fields of one image each.
        order = np.argsort(cells["image"], kind="stable")
        for number in np.unique(cells["image"]):
            rows = order[cells["image"][order] == number]
            yield {}, {"cell_id": [text["cell_id"][r] for r in rows],
                       "image_number": cells["image"][rows], "object_number": cells["object"][rows],
                       "group": [groups[g] for g in cells["group"][rows]],
                       "crop_path": [text["crop"][r] for r in rows],
                       "features": np.ascontiguousarray(values[rows][:, keep])}
        return
    for fld in task["fields"]:
        values, cells, _ = planning.rows_of(work, sizes, [fld["rows"]], opened)
        yield fld, {"cell_id": [f"{i}-{o}" for i, o in zip(cells["image"], cells["object"])],
                    "image_number": cells["image"], "object_number": cells["object"],
                    "group": [fld["group"]] * len(cells), "x": cells["x"], "y": cells["y"],
                    "features": np.ascontiguousarray(values[:, keep])}


def write_part(task: dict) -> dict:
    """Write one shard and its summary. Pure and idempotent: the same task gives the same bytes.
    The summary returned also holds `stages`, the seconds each stage took (see
    tfrecords_tools.stages)."""
    out_dir = Path(task["out_dir"])
    final = out_dir / task["file"]
    tmp = partial_path(final)
    timer = StageTimer()
    try:
        hist, crop_dtype, files, records, features, sha256 = _write_records(task, tmp, timer)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a shard stopped by bad input is not left half-written
        raise
    os.replace(tmp, final)
    summary = {
        "file": task["file"], "split": task["split"], "treatment": task["treatment"],
        "records": records, "bytes": final.stat().st_size, "sha256": sha256,
        "plan_hash": task["plan_hash"], "dtype": str(crop_dtype), "source_files": files,
    }
    parts = out_dir / PARTS
    with timer.stage("statistics"):
        if task["split"] == "train":  # what the manifest's intensities and statistics are from
            summary["hist_sha256"] = _save_npy(parts / f"{task['file']}.hist.npy", hist)
            values = features.reshape(records, -1)
            summary["moments"] = part_moments(values)
            summary["values_sha256"] = _save_npy(parts / f"{task['file']}.values.npy",
                                                 sorted_part_values(values))
    with timer.stage("write"):
        write_json(parts / f"{task['file']}.json", summary)
    return dict(summary, stages=timer.ordered())


def _write_records(task: dict, tmp: Path, timer: StageTimer):
    """A shard's records into `tmp`, a field (or a table's image) at a time: (pixel histogram
    of a training shard, crop dtype, files read, records, features [n, F], the file's sha256)."""
    files, records, features, crop_dtype = {}, 0, [], None
    hist = _Histogram(timer) if task["split"] == "train" else None
    with TFRecordWriter(tmp, task["compression"], timer=timer) as writer, \
            _ReadAhead(task, timer) as ahead:
        for fld, batch, fetched in ahead.fields(_timed(shard_cells(task), timer, "rows")):
            crops = _batch_crops(task, fld, batch, files, timer, fetched)
            crop_dtype = crop_dtype or crops.dtype
            if crops.dtype != crop_dtype:
                raise UserInputError(f"{batch['cell_id'][0]}: crop dtype {crops.dtype} differs "
                                     f"from {crop_dtype} of other cells; use images of one bit "
                                     "depth.")
            if hist is not None:
                hist.add(crops)
            with timer.stage("serialize"):
                examples = encode_examples(batch["features"], crops, batch["cell_id"],
                                           batch["image_number"], batch["object_number"],
                                           task["treatment"], task["treatment_index"],
                                           batch["group"])
            writer.write_many(examples)
            features.append(np.asarray(batch["features"], dtype=np.float32))
            records += len(crops)
    values = np.concatenate(features) if features else np.zeros((0, len(task["keep"])),
                                                                 np.float32)
    return (hist.total() if hist else None), crop_dtype, files, records, values, writer.sha256


def _timed(items, timer: StageTimer, name: str):
    """The items of an iterator, the time taken to make each added to stage `name`."""
    items = iter(items)
    while True:
        with timer.stage(name):
            item = next(items, None)
        if item is None:
            return
        yield item


class _ReadAhead:
    """A shard's fields with their image files (or a table image's crop files) read and hashed
    one field ahead, in a thread, while the field before is cut, encoded and written.

    File reads and sha256 release the GIL, so on a machine with a core to spare they cost
    little more than waiting for them; from a network file system the reads overlap the work
    too. At most two fields' files are held. Results and their order are what reading each
    field in turn gives; a file that cannot be read raises when its field's turn comes. The
    thread's own seconds are the stage "read-ahead", outside the wall-clock stages (see
    tfrecords_tools.stages.OVERLAPPED); "read" is then the wait for the bytes and the decoding.
    """

    def __init__(self, task: dict, timer: StageTimer):
        self.task, self.timer = task, timer
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _paths(self, fld: dict, batch: dict) -> list[str]:
        return list(batch["crop_path"]) if self.task["table"] else list(fld["paths"])

    @staticmethod
    def _fetch_all(paths: list[str]) -> tuple[dict, float]:
        start = time.perf_counter()
        return {path: fetch(path) for path in dict.fromkeys(paths)}, time.perf_counter() - start

    def fields(self, items):
        """(fld, batch, {path: fetch(path)}) for each (fld, batch) of `items`."""
        items = iter(items)
        item = next(items, None)
        pending = self.pool.submit(self._fetch_all, self._paths(*item)) if item else None
        while item is not None:
            following = next(items, None)
            ahead = (self.pool.submit(self._fetch_all, self._paths(*following))
                     if following is not None else None)
            with self.timer.stage("read"):
                fetched, busy = pending.result()
            self.timer.add({"read-ahead": busy})
            yield item[0], item[1], fetched
            item, pending = following, ahead


def _batch_crops(task: dict, fld: dict, batch: dict, files: dict, timer: StageTimer,
                 fetched: dict | None = None):
    """The crops of one field's cells (or of a table's image), [n, size, size, C].
    `fetched`: {path: fetch(path)} of its files, read already."""
    size = task["crop_size"]
    fetched = fetched or {}
    if task["table"]:
        crops = []
        for path in batch["crop_path"]:
            raw, files[path] = read_array(path, timer, fetched.get(path))
            with timer.stage("crop"):
                crops.append(fit_table_crop(np.asarray(raw), len(task["channels"]), size, path))
        with timer.stage("crop"):
            odd = next((k for k, c in enumerate(crops) if c.dtype != crops[0].dtype), None)
            if odd is not None:
                raise UserInputError(f"{batch['cell_id'][odd]}: crop dtype {crops[odd].dtype} "
                                     f"differs from {crops[0].dtype} of other cells; use images "
                                     "of one bit depth.")
            return np.stack(crops)
    planes, fld_files = read_planes(fld["paths"], fld.get("illum"), task.get("scaling"),
                                    task.get("rescale"), timer, fetched)
    files.update(fld_files)
    shapes = {p.shape for p in planes}
    if shapes != {tuple(fld["shape"])}:
        height, width = max(shapes - {tuple(fld["shape"])}, default=fld["shape"])[:2]
        raise UserInputError(f"{fld['paths'][0]}: image is {width}x{height} px "
                             "but its header said otherwise; the file may be corrupt.")
    with timer.stage("crop"):
        return cut_crops(planes, batch["x"], batch["y"], size, task["edge"])


class _Histogram:
    """A training shard's pixel histogram, taken HISTOGRAM_CROPS crops at a time: bincount's
    65,536 bins cost more than a field of 24 crops, so fields are gathered first."""

    def __init__(self, timer: StageTimer):
        self.timer = timer
        self.hist, self.pending, self.count = None, [], 0

    def add(self, crops: np.ndarray) -> None:
        self.pending.append(crops)
        self.count += len(crops)
        if self.count >= HISTOGRAM_CROPS:
            self._flush()

    def _flush(self) -> None:
        if not self.count:
            return
        with self.timer.stage("histogram"):
            crops = np.concatenate(self.pending)
            if self.hist is None:
                self.hist = np.zeros((crops.shape[-1], histogram_bins(crops.dtype)), np.int64)
            self.hist += pixel_histogram(crops, self.hist.shape[1])
        self.pending, self.count = [], 0

    def total(self):
        self._flush()
        return self.hist


HISTOGRAM_CROPS = 512


def _save_npy(path: Path, array) -> str:
    """np.save under a temporary name, renamed when complete; the file's sha256 (of the bytes
    written, not read back)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    tmp = partial_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Orchestration


def prepare_output(out_dir: Path, overwrite: bool) -> bool:
    """Make out_dir ready; True when it holds unfinished work of an earlier run to resume."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: exists and is a file; OUT_DIR must be a folder.")
    manifest = out_dir / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise UserInputError(f"{out_dir}: already holds a dataset ({MANIFEST}). "
                                 "Pass --overwrite to replace it, or choose another OUT_DIR.")
        manifest.unlink()  # first: a half-replaced dataset must never look complete
        for path in out_dir.glob("*.tfrecord"):
            path.unlink()
        for name in (REJECTS, PARTS):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if out_dir.exists() and not (out_dir / PARTS).exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserInputError(f"{out_dir}: exists and is not empty, but holds no cp2image-tf "
                             "dataset. Choose an empty or new OUT_DIR, or pass --overwrite "
                             "(only files convert writes are removed).")
    resuming = (out_dir / PARTS).is_dir()
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    return resuming


def build_tasks(plan: dict, plan_dir: Path, config: ConvertConfig, out_dir: Path) -> list[dict]:
    """One small task per shard: which rows of the plan's segments it holds (never the rows)."""
    treatment_index = {t: i for i, t in enumerate(plan["treatments"])}
    scaling = plan["cellprofiler"].get("scaling", {})
    tasks = []
    for shard in plan["shards"]:
        task = {"file": shard["file"], "split": shard["split"], "treatment": shard["treatment"],
                "treatment_index": treatment_index[shard["treatment"]],
                "out_dir": str(out_dir), "plan_dir": str(plan_dir), "keep": plan["keep"],
                "fingerprint": plan["fingerprint"], "compression": config.compression,
                "crop_size": config.crop_size, "edge": config.edge, "table": config.table,
                "channels": list(config.channels),
                # With --illum every channel is cropped as CellProfiler saw it: pixels / scaling
                # (/ the illumination function where one is named), float32.
                "scaling": [scaling.get(ch) for ch in config.channels] if config.illum else None,
                "rescale": [ch in plan.get("rescaled", {}) for ch in config.channels]
                if plan.get("rescaled") else None}
        if config.table:
            task["order"] = shard["order"]
            task["cells"] = shard["order"][2] - shard["order"][1]
        else:
            task["fields"] = []
            for number, start, stop in shard["fields"]:
                fld = plan["fields"][str(number)]
                entry = {"image_number": number, "rows": [start, stop], "paths": fld["paths"],
                         "shape": tuple(fld["shape"]), "group": fld["group"]}
                if fld["illum"]:
                    entry["illum"] = fld["illum"]
                task["fields"].append(entry)
            task["cells"] = sum(stop - start for _, start, stop in shard["fields"])
        task["plan_hash"] = task_hash(task)
        tasks.append(task)
    return tasks


def task_hash(task: dict) -> str:
    """What the shard's bytes depend on: the plan (its inputs' checksums and options), the
    shard's rows and fields, the features kept and how crops are cut."""
    digest = hashlib.sha256()
    for key in ("fingerprint", "file", "split", "treatment", "treatment_index", "compression",
                "crop_size", "edge", "table", "channels", "scaling", "rescale", "keep", "order"):
        digest.update(repr(task.get(key)).encode())
    for fld in task.get("fields", []):
        digest.update(repr((fld["image_number"], fld["rows"], fld["paths"], fld.get("illum"),
                            fld["shape"], fld["group"])).encode())
    return digest.hexdigest()


def check_part(out_dir: Path, task: dict) -> tuple[dict | None, str | None]:
    """(summary, None) for a part an earlier run completed, verified by checksum; else
    (None, what is wrong with it)."""
    parts = out_dir / PARTS
    aux = ["hist", "values"] if task["split"] == "train" else []

    def checksums(summary):
        return ([(out_dir / task["file"], summary.get("sha256"))]
                + [(parts / f"{task['file']}.{kind}.npy", summary.get(f"{kind}_sha256"))
                   for kind in aux])

    summary, problem = verify_part(parts / f"{task['file']}.json", task["plan_hash"],
                                   "plan_hash", checksums)
    if summary is not None and task["split"] == "train" and "moments" not in summary:
        return None, "its summary holds no moments (corrupt)"
    return summary, problem


def _known_part(out_dir: Path, task: dict, known: dict) -> tuple[dict | None, str | None]:
    """check_part for a part whose summary this run holds: its files are there at their sizes."""
    summary = known[task["file"]]
    shard = out_dir / task["file"]
    if not shard.is_file() or shard.stat().st_size != summary["bytes"]:
        return None, f"{task['file']} is missing or not the size it was written at"
    aux = ["hist", "values"] if task["split"] == "train" else []
    missing = [k for k in aux if not (out_dir / PARTS / f"{task['file']}.{k}.npy").is_file()]
    if missing:
        return None, f"{task['file']}.{missing[0]}.npy is missing"
    return summary, None


def write_parts(tasks: list[dict], workers: int, progress: bool, scheduler: str | None = None,
                client=None):
    """Write the shards (one process, a process pool or Dask) with a progress bar over parts."""
    total_cells = sum(t["cells"] for t in tasks)
    keys = [f"convert-{t['file']}-{t['plan_hash'][:16]}" for t in tasks]
    results = [None] * len(tasks)
    for k, summary in run_parts(write_part, tasks, keys, cells=lambda s: s["records"],
                                scheduler=scheduler, workers=workers, progress=progress,
                                desc="convert", unit="shard", client=client,
                                total_cells=total_cells):
        results[k] = summary
    return results


def intensity_ranges(summaries, out_dir: Path, channels, dtype: str, percentile: float) -> dict:
    """Per-channel dataset-level intensity range from the training split's pixel histograms."""
    hist = None
    for summary in summaries:
        if summary["split"] != "train":
            continue
        part = np.load(out_dir / PARTS / f"{summary['file']}.hist.npy")
        hist = part if hist is None else hist + part
    np_dtype = np.dtype(dtype)
    integer = np_dtype.kind in "ui" and np_dtype.itemsize <= 2
    ranges = {}
    for c, ch in enumerate(channels):
        counts = hist[c]
        cumulative = np.cumsum(counts)
        total = cumulative[-1]
        high_bin = int(np.searchsorted(cumulative, percentile / 100.0 * total, side="left"))
        max_bin = int(np.nonzero(counts)[0].max()) if total else 0
        unit = 1.0 if integer else 1.0 / (counts.size - 1)  # value of one bin
        ranges[ch] = {"low": 0.0, "high": max(high_bin, 1) * unit, "percentile": percentile,
                      "max": max_bin * unit,
                      "mean": float(counts @ np.arange(counts.size, dtype=np.float64)) * unit
                      / max(int(total), 1)}
    return ranges


def convert(config: ConvertConfig, progress: bool = True, command: list[str] | None = None,
            part: tuple[int, int] | str | None = None, finalize: bool = False,
            client=None, timings: dict | None = None) -> dict:
    """Convert CellProfiler outputs (or a single-cell table with crops) into a TFRecord dataset.

    Returns the manifest. Safe to interrupt: re-running the same call finishes
    the job, redoing only shards that are not complete (completed ones are
    verified by checksum). `config.scheduler` runs the shards on Dask ("local":
    a LocalCluster of `config.workers` processes; or a scheduler address);
    `client`: an open distributed.Client to use instead.

    `part=(I, N)` (or "I/N") writes only the I-th of N groups of shards and
    returns a summary of that part, not a manifest; `finalize=True` then
    gathers the completed parts into the manifest, with a clear error naming
    any part that is missing or corrupt.

    `timings`: a dict to fill with the seconds each stage took, summed over the parts written
    (tfrecords_tools.stages; what benchmarks/bench_convert.py prints).
    """
    started = time.time()
    part = parse_part(part)
    check_options(config.scheduler, config.workers, part, finalize)
    with client_for(config.scheduler, config.workers, client, finalize,
                    quiet=not progress) as client:
        timer = StageTimer()
        result = _convert(config, progress, command, part, finalize, client, started, timer)
    if timings is not None:
        timings.update(timer.ordered())
    return result


def _convert(config, progress, command, part, finalize, client, started, timer):
    if part is not None and config.overwrite:
        raise UserInputError("--overwrite with --part: parts of one job run at the same time and "
                             "must not remove each other's shards. Remove OUT_DIR (or run "
                             "without --part --overwrite) first.")
    out_dir = Path(config.out_dir)
    if not config.overwrite and (out_dir / MANIFEST).exists():
        prepare_output(out_dir, False)  # raises the clear error before any work
    if finalize and not (out_dir / PARTS).is_dir():
        raise UserInputError(f"{out_dir}: no parts to finalize ({PARTS} not found); run the "
                             "parts first (--part I/N), with the same INPUT, OUT_DIR and options.")
    config.validate()
    make_parent(out_dir)
    with run_lock(out_dir) if part is None else contextlib.nullcontext():
        return _write_dataset(config, progress, command, part, finalize, client, started, timer)


def _write_dataset(config, progress, command, part, finalize, client, started, timer):
    out_dir = Path(config.out_dir)
    remove_dead_plans(out_dir)
    with PlanLock(config, out_dir, progress) as lock, timer.stage("plan"):
        plan, plan_dir = load_or_plan(config, out_dir, progress, lock)
        resuming = prepare_output(out_dir, config.overwrite and not finalize)
        plan_dir = adopt_plan(plan_dir, out_dir)
    tasks = build_tasks(plan, plan_dir, config, out_dir)
    if finalize:
        return finish(config, plan, plan_dir, tasks, out_dir, command, started, timer=timer)
    if part is None:
        planned = {t["file"] for t in tasks}
        for stale in out_dir.glob("*.tfrecord"):
            if stale.name not in planned:
                stale.unlink()
    else:
        write_partition(out_dir / PARTS, part[1], len(tasks))
    selected = select_part(tasks, part)
    done, todo = [], []
    for task in selected:
        summary, _ = check_part(out_dir, task)
        (done if summary else todo).append(summary or task)
    if resuming and progress and done:
        print(f"Resuming: {len(done)} of {len(selected)} shards already complete.", file=sys.stderr)
    written = write_parts(todo, config.workers, progress, config.scheduler, client)
    for summary in written:
        timer.add(summary.get("stages"))
    if part is not None:
        return {"part": list(part), "shards": [t["file"] for t in selected],
                "written": len(written), "already_complete": len(done),
                "cells": sum(s["records"] for s in done + written),
                "total_shards": len(tasks), "seconds": round(time.time() - started, 2)}
    # Parts this run wrote, or verified by checksum a moment ago, are not read again.
    known = {s["file"]: s for s in done + written}
    return finish(config, plan, plan_dir, tasks, out_dir, command, started, known, timer)


class PlanLock:
    """One planner per job: the parts of a Slurm array start together, and each would otherwise
    plan the whole screen (its time, and its segments' disk space) at once. The first takes
    OUT_DIR's plan lock (a file beside OUT_DIR naming its process, see tfrecords_tools.locks);
    the others wait for its plan, or take the lock over once its holder is gone. Held until the
    plan is in OUT_DIR/.parts."""

    POLL = 2.0
    STALE = locks.STALE

    def __init__(self, config, out_dir: Path, progress: bool):
        self.key = planning.plan_key(config)
        self.path = out_dir.resolve().parent / f".{out_dir.name}.plan-{self.key}.lock"
        self.plan = out_dir / PARTS / f"plan-{self.key}" / planning.PLAN
        self.progress = progress
        self.lock = locks.LockFile(self.path)

    @property
    def held(self) -> bool:
        return self.lock.held

    def acquire(self) -> bool:
        """True once this run holds the lock; False when another run's plan is ready."""
        said = False
        while not self.plan.is_file():
            if self.lock.try_acquire():
                return True
            if self.progress and not said:
                print(f"Waiting for {self.lock.holder()}, which is planning this job (lock "
                      f"{self.path}); its plan is used when ready, and the lock taken over if "
                      f"that process ends or stops touching it for {self.STALE:.0f} s.",
                      file=sys.stderr)
                said = True
            time.sleep(self.POLL)
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """One convert at a time writes a dataset (--part runs share it and take none): a second
    run into the same OUT_DIR is refused at once, before it plans or removes anything."""
    lock = locks.LockFile(out_dir.resolve().parent / f".{out_dir.name}.convert.lock")
    if not lock.try_acquire():
        raise UserInputError(f"{out_dir}: {lock.holder()} is converting into this folder now. "
                             "Wait for it to finish (or stop it), then run again; or choose "
                             "another OUT_DIR.")
    try:
        yield
    finally:
        lock.release()


def make_parent(out_dir: Path) -> None:
    """OUT_DIR's parent folder, made when missing (the lock files and the plan live there)."""
    try:
        out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"{out_dir.parent}: cannot be made ({err.strerror}); give an "
                             "OUT_DIR in a folder you can write to.") from None


def load_or_plan(config, out_dir: Path, progress: bool = False,
                 lock: PlanLock | None = None) -> tuple[dict, Path]:
    """The plan an earlier run or another --part left in OUT_DIR for these inputs and options,
    else a new one. A new plan is made beside OUT_DIR (a dataset being replaced with
    --overwrite stays whole until the plan is made) and moved in by adopt_plan. With `lock`,
    only one run of a job plans; the others wait for its plan."""
    config.validate()
    key = planning.plan_key(config)
    existing = out_dir / PARTS / f"plan-{key}"
    if config.overwrite:
        shutil.rmtree(existing, ignore_errors=True)
    if lock is not None and not config.overwrite:
        lock.acquire()
    if (existing / planning.PLAN).is_file():
        return json.loads((existing / planning.PLAN).read_text()), existing
    if lock is not None and lock.held:  # a planner of this job killed before the end left these
        for stale in out_dir.resolve().parent.glob(f".{out_dir.name}.plan-{key}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    work = out_dir.resolve().parent / (f".{out_dir.name}.plan-{key}.{os.getpid()}@"
                                       f"{socket.gethostname()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        plan = plan_dataset(config, work, progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return plan, work


def remove_dead_plans(out_dir: Path) -> None:
    """Plan folders beside OUT_DIR that planners killed before the end left (of any inputs or
    options): those of processes gone from this host, and those of the older form without a
    host that are more than STALE_SECONDS old."""
    host = socket.gethostname()
    for path in out_dir.resolve().parent.glob(f".{out_dir.name}.plan-*.partial"):
        # .<name>.plan-<key>.<pid>@<host>.partial: the key has no dot, a host may have some.
        owner = path.name[len(f".{out_dir.name}.plan-"):-len(".partial")].partition(".")[2]
        pid, sep, where = owner.partition("@")
        if sep:
            dead = where == host and pid.isdigit() and not pid_alive(int(pid))
        else:
            try:
                dead = time.time() - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if dead and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def adopt_plan(plan_dir: Path, out_dir: Path) -> Path:
    """The plan's folder inside OUT_DIR/.parts (where every part finds it), moved there when it
    was just made; another run's plan of the same key is the same plan, so the first one stays.
    Plans of other inputs or options are removed."""
    parts = out_dir / PARTS
    if plan_dir.parent == parts:
        return plan_dir
    key = plan_dir.name.split(".plan-", 1)[1].split(".", 1)[0]
    final = parts / f"plan-{key}"
    try:
        os.rename(plan_dir, final)
    except OSError:
        shutil.rmtree(plan_dir, ignore_errors=True)
        if not (final / planning.PLAN).is_file():
            raise
    for stale in parts.glob("plan-*"):
        if stale != final and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def finish(config, plan, plan_dir: Path, tasks, out_dir: Path, command, started,
           known: dict | None = None, timer: StageTimer | None = None) -> dict:
    """Gather every part's summary (verified) into rejects.csv and the manifest. `known`: the
    summaries of parts this run wrote or verified (file -> summary), checked by size only."""
    timer = timer or StageTimer()
    summaries, problems = [], []
    for position, task in enumerate(tasks):
        with timer.stage("finish"):
            summary, problem = _known_part(out_dir, task, known) if task["file"] in (known or {}) \
                else check_part(out_dir, task)
        if problem:
            problems.append((position, task, problem))
        summaries.append(summary)
    if problems:
        position, task, problem = problems[0]
        label = part_label(position, len(tasks), out_dir / PARTS)
        which, rerun = (f"part {label}", f"--part {label}") if label else ("a part", "its part")
        more = f" ({len(problems) - 1} more shard(s) incomplete)" if len(problems) > 1 else ""
        raise UserInputError(f"{out_dir}: {which} is not complete: shard {task['file']}: "
                             f"{problem}{more}. Run {rerun} again, then --finalize.")
    dtypes = {s["dtype"] for s in summaries if s["records"]}
    if len(dtypes) > 1:
        raise UserInputError(f"{config.input}: images of different bit depths ({', '.join(sorted(dtypes))}); "
                             "convert each kind separately or save them at one bit depth.")
    dtype = dtypes.pop()
    train = [s for s in summaries if s["split"] == "train"]
    with timer.stage("statistics"):
        plan = dict(plan, stats=statistics_from_parts(
            [s["moments"] for s in train],
            [out_dir / PARTS / f"{s['file']}.values.npy" for s in train], len(plan["names"])))
    with timer.stage("finish"):
        manifest = build_manifest(config, plan, summaries, out_dir, dtype, command, started)
    tmp = partial_path(out_dir / REJECTS)
    shutil.copyfile(plan_dir / REJECTS, tmp)
    os.replace(tmp, out_dir / REJECTS)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(out_dir / PARTS, ignore_errors=True)
    for stale in out_dir.glob(".*.partial"):  # left by attempts that were killed
        stale.unlink(missing_ok=True)
    return manifest


def build_manifest(config, plan, summaries, out_dir, dtype, command, started) -> dict:
    counts = plan["counts"]
    written = sum(s["records"] for s in summaries)
    if written != counts["cells"]:
        raise RuntimeError(f"wrote {written} records for {counts['cells']} planned cells")
    source_files = []
    base = Path(config.input).resolve()
    base = base if base.is_dir() else base.parent
    for source in plan["sources"]:
        source_files.append({"path": _relative(source["path"], base), "bytes": source["bytes"],
                             "sha256": source["sha256"]})
    images = {}
    for s in summaries:
        images.update(s["source_files"])
    for path in sorted(images):
        source_files.append({"path": _relative(path, base), **images[path]})
    size = config.crop_size
    channels = list(config.channels)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "cp2image-tf", "version": __version__},
        "command": command if command is not None else sys.argv,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                   if k not in ConvertConfig.RUN_OPTIONS},
        "seconds": round(time.time() - started, 2),
        "source": {"kind": "table" if config.table else "cellprofiler",
                   "input": str(base), "objects": list(config.objects) if not config.table else None,
                   "compartments": plan["compartments"], "files": source_files},
        "channels": channels,
        # The image each channel's features were measured on (e.g. rawGFP -> CorrGreen).
        "measured_as": plan["measured_as"],
        # How CellProfiler saw the images: the illumination functions cropped with (--illum),
        # Image.csv's Scaling_<channel> and the training images' Threshold_FinalThreshold_<object>.
        "cellprofiler": plan["cellprofiler"],
        "crop": {"height": size, "width": size, "channels": len(channels), "dtype": dtype,
                 "layout": "HWC", "dtype_max": dtype_max(dtype), "edge": config.edge,
                 "centre": "pixel (floor(y + 0.5), floor(x + 0.5)) of Location_Center_X/Y at "
                           f"row/column {size // 2} of the crop",
                 # Channels whose files mix 8-bit and 16-bit: how the 8-bit ones were rescaled.
                 **({"rescaled": plan["rescaled"]} if plan.get("rescaled") else {})},
        "intensity": intensity_ranges(summaries, out_dir, channels, dtype,
                                      config.intensity_percentile),
        "features": {
            "names": plan["names"], "count": len(plan["names"]),
            "stats": plan["stats"], "dropped": plan["dropped"],
            "nonfinite": "stored as they are; the reader replaces NaN/inf with the training median",
        },
        "treatments": {"columns": plan["treatment_columns"], "names": plan["treatments"],
                       "metadata": plan["treatment_metadata"]},
        "split": {"by": plan["split_by"], "fractions": list(config.split), "seed": config.seed,
                  "groups": plan["groups"]},
        "counts": {"cells": counts["cells"], "rejected": plan["rejects"]["count"],
                   "splits": counts["splits"], "treatments": counts["treatments"]},
        "rejects": {"file": REJECTS, "count": plan["rejects"]["count"],
                    "by_reason": plan["rejects"]["by_reason"]},
        "compression": config.compression,
        "shards": [{k: s[k] for k in ("file", "split", "treatment", "records", "bytes", "sha256")}
                   for s in summaries],
    }


def _relative(path, base: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
