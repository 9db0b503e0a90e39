"""convert at screen sizes, against the I/O floor of reading its TIFFs.

The sample's CellProfiler tables are repeated to each size (benchmarks/_replicate.py: new
ImageNumbers, the same TIFFs, nothing re-drawn). Side by side in one run, every figure from a
fresh process (peak RSS is that process's, with its workers'):
  - the floor: read and decode every channel TIFF of every field once (what any converter must
    do), in one process; measured at the smallest size (per cell, it is the same at every size:
    the copies read the same files); and the floor plus writing as many bytes as the shards'
    crops hold (68 x 68 x 3 16-bit pixels a cell), what a converter cannot avoid either
  - planning alone (the streaming planner: tables read, joined, checked, split, shards laid
    out) at every size
  - convert end to end with 1 worker (reading the tables, planning, worker start-up, writing)
    at sizes up to --write-up-to, and with 2 (--workers) at the smallest size
Prints cells/s, each one's speed as a fraction of the floor's and the peak RSS; then where one
worker's time goes, stage by stage (tfrecords_tools.stages: plan, read, checksum, scale, crop,
histogram, serialize, compress, write, statistics, finish), a planned peak RSS for --plan-cells
and the compression choices side by side (size, compress and decompress speed on one shard's
records). `--profile` adds a cProfile run of one worker's convert at each size written (top
functions by own time; cProfile slows Python code, so its seconds are not the table's).

    python benchmarks/bench_convert.py --cells 20000 [--sizes 200000] [--write-up-to 200000]
        [--sample DIR] [--profile] [--workers 1,2] [--plan-cells 7000000] [--baseline DIR]
        [--repeats 6]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd

from _replicate import replicate
from _sample import sample_folder
from tfrecords_tools.stages import OVERLAPPED

CHANNELS = ["DNA", "Tubulin", "Actin"]
SPLIT_BY = ["Metadata_Plate", "Metadata_Well"]

# Run in a child process: one measurement, its peak RSS (with its own children's) as JSON.
CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time
from pathlib import Path
import pandas as pd, tifffile
from tfrecords_tools.convert import ConvertConfig, convert, plan_dataset
kind, cp_dir, out, workers = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()  # imports done: the same for every measurement
stages, profile = {}, None
if kind.startswith("floor"):
    image = pd.read_csv(Path(cp_dir) / "Image.csv")
    for ch in %(channels)r:
        for folder, name in zip(image[f"PathName_{ch}"], image[f"FileName_{ch}"]):
            tifffile.imread(Path(folder) / name)
    cells = None
    if kind == "floor+write":  # and write as many bytes as the shards hold (68x68x3 uint16)
        total = int(sys.argv[5]) * 68 * 68 * 3 * 2
        block = bytes(1 << 22)
        with open(out, "wb") as handle:
            for at in range(0, total, len(block)):
                handle.write(block[:min(len(block), total - at)])
else:
    config = ConvertConfig(input=cp_dir, out_dir=str(out), channels=%(channels)r,
                           objects=["Nuclei", "Cells"], split_by=%(split_by)r, workers=workers)
    if kind == "plan":
        out.mkdir(parents=True)
        plan = plan_dataset(config, out)
        cells = plan["counts"]["cells"] + plan["rejects"]["count"]
    else:
        profiler = cProfile.Profile() if kind == "profile" else None
        if profiler:
            profiler.enable()
        try:
            manifest = convert(config, progress=False, timings=stages)
        except TypeError:  # --baseline code, from before convert took timings
            manifest = convert(config, progress=False)
        cells = manifest["counts"]["cells"] + manifest["counts"]["rejected"]
        if profiler:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            profile = text.getvalue()
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
import tfrecords_tools
print(json.dumps({"seconds": seconds, "cells": cells, "peak_gb": peak / 1e6, "stages": stages,
                  "profile": profile, "code": tfrecords_tools.__file__}))
""" % {"channels": CHANNELS, "split_by": SPLIT_BY}


def measure(kind: str, cp_dir: Path, out: Path, workers: int = 1, cells: int = 0,
            code: Path | None = None) -> dict:
    """One measurement in a fresh process; `code`: a folder holding another version's
    tfrecords_tools, imported instead of this one."""
    path = ([str(code)] if code else []) + sys.path
    # -P: not the current folder first on the path, where a checkout would shadow `code`
    result = subprocess.run([sys.executable, "-P", "-c", CHILD, kind, str(cp_dir), str(out),
                             str(workers), str(cells)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if code and not Path(measured["code"]).resolve().is_relative_to(Path(code).resolve()):
        raise RuntimeError(f"the --baseline run imported {measured['code']}, not {code}'s")
    return measured


def measure_size(size, cp_dir, root, args, rows, first: bool) -> dict:
    """Every measurement at one size, appended to rows as (size, name, result); the 1-worker
    convert's result (for the stage table), if one was made."""
    if first:
        rows.append((size, "read every TIFF once (I/O floor)", measure("floor", cp_dir,
                                                                        root / "none")))
        rows.append((size, "  the same + write the crops' bytes",
                     measure("floor+write", cp_dir, root / "bytes", cells=size)))
        (root / "bytes").unlink()
    rows.append((size, "plan (streaming)", measure("plan", cp_dir, root / f"plan{size}")))
    shutil.rmtree(root / f"plan{size}", ignore_errors=True)
    one = None
    if size <= args.write_up_to:
        for workers in args.workers if first else [1]:  # the speed-up at the smallest size
            out = root / f"out{size}-{workers}"
            result = measure("convert", cp_dir, out, workers)
            rows.append((size, f"convert, {workers} worker(s)", result))
            if workers == 1:
                one = result
                if first:  # one shard kept for the compression table
                    shard = next(iter(sorted(out.glob("train-*.tfrecord"))))
                    shutil.copyfile(shard, root / "shard.tfrecord")
            shutil.rmtree(out, ignore_errors=True)
        if args.baseline:
            out = root / f"base{size}"
            rows.append((size, "convert, 1 worker, --baseline code",
                         measure("convert", cp_dir, out, 1, code=args.baseline)))
            shutil.rmtree(out, ignore_errors=True)
            if first and args.repeats:
                interleaved(cp_dir, root, size, args)
        if args.profile:
            result = measure("profile", cp_dir, root / f"prof{size}", 1)
            shutil.rmtree(root / f"prof{size}", ignore_errors=True)
            print(f"\ncProfile of convert, 1 worker, {size} cells ({result['seconds']:.1f} s "
                  f"profiled):\n{result['profile']}", flush=True)
    return one


def interleaved(cp_dir: Path, root: Path, size: int, args) -> None:
    """The 1-worker convert of this code and of --baseline, alternately, --repeats times each
    (which goes first alternating too): on a shared machine the load moves between two
    measurements, so a comparison is only as good as its interleaving."""
    import statistics

    seconds = {"this code": [], "--baseline code": []}
    for k in range(args.repeats):
        order = [("this code", None), ("--baseline code", args.baseline)]
        for name, code in order[::-1] if k % 2 else order:
            seconds[name].append(measure("convert", cp_dir, root / "inter", 1, code=code)["seconds"])
            shutil.rmtree(root / "inter", ignore_errors=True)
    print(f"\nInterleaved, 1 worker, {size} cells, {args.repeats} runs each (us a cell):")
    for name, values in seconds.items():
        print(f"  {name:<16} median {1e6 * statistics.median(values) / size:6.0f}   "
              + ", ".join(f"{1e6 * v / size:.0f}" for v in values))
    ratio = statistics.median(seconds["--baseline code"]) / statistics.median(seconds["this code"])
    print(f"  this code is {ratio:.2f}x the speed of the baseline", flush=True)


def print_rows(rows, floor_rate):
    print(f"\n{'cells':>9} {'':<34} {'seconds':>8} {'cells/s':>9} {'us/cell':>8} "
          f"{'x floor':>8} {'peak RSS GB':>12}")
    for size, name, r in rows:
        rate = r["cells"] / r["seconds"] if r["cells"] else size / r["seconds"]
        print(f"{size:>9} {name:<34} {r['seconds']:>8.1f} {rate:>9.0f} "
              f"{1e6 / rate:>8.1f} {rate / floor_rate:>8.2f} {r['peak_gb']:>12.2f}")


def print_stages(ones: dict):
    """One worker's seconds per stage at each size, and per cell."""
    sizes = sorted(ones)
    names = list(dict.fromkeys(n for s in sizes for n in ones[s]["stages"]))
    names = [n for n in names if n not in OVERLAPPED] + [n for n in names if n in OVERLAPPED]
    print("\nWhere one worker's convert goes (seconds, and us a cell), tfrecords_tools.stages:")
    print(f"{'stage':<12}" + "".join(f"{f'{s} s':>12}{'us/cell':>9}" for s in sizes))
    for name in names + ["(other)", "total"]:
        line = f"{name:<12}"
        for s in sizes:
            timed = ones[s]["stages"]
            value = ones[s]["seconds"] if name == "total" else \
                ones[s]["seconds"] - sum(v for n, v in timed.items() if n not in OVERLAPPED) \
                if name == "(other)" else timed.get(name, 0.0)
            line += f"{value:>12.2f}{1e6 * value / s:>9.1f}"
        print(line)
    print("(other): imports-free start-up, worker start-up, the parent's bookkeeping.")
    if any(n in OVERLAPPED for n in names):
        print("read-ahead: the next field's files read and hashed in a thread, beside the stages "
              "above (not in the total); \"read\" is then the wait for them and the decoding.")


def print_plan(rows, cells: int):
    """Peak RSS at `cells` from the whole-convert figures (else planning's), a straight line
    through the two largest sizes measured."""
    for name in ("convert, 1 worker(s)", "plan (streaming)"):
        points = sorted((s, r["peak_gb"]) for s, n, r in rows if n == name)
        if len(points) >= 2:
            (s0, g0), (s1, g1) = points[-2], points[-1]
            slope = (g1 - g0) / (s1 - s0)
            print(f"\nPlanned peak RSS of {name.split(',')[0]} at {cells:,} cells: "
                  f"{g1 + slope * (cells - s1):.2f} GB ({1e9 * slope:.0f} bytes a cell beyond "
                  f"{g1:.2f} GB at {s1:,}; {g1 / g0:.2f}x from {s0:,} to {s1:,} cells).")
            return


def records_of(path: Path) -> list:
    """The records of an uncompressed TFRecord file (framing only; no TensorFlow)."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 8], "little")
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return records


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compression_table(shard: Path, folder: Path):
    """Each compression TFRecordWriter offers, on one shard's records: size, write and read."""
    from tfrecords_tools.stages import StageTimer
    from tfrecords_tools.tfrecord_io import TFRecordWriter

    records = records_of(shard)
    raw = sum(len(r) + 16 for r in records)
    print(f"\nCompression of one training shard ({len(records)} records, {raw / 1e6:.1f} MB "
          "uncompressed), TFRecordWriter; read = zlib's decompression, as TensorFlow's reader:")
    print(f"{'choice':<10} {'size':>7} {'compress MB/s':>14} {'write s':>8} {'us/cell':>8} "
          f"{'decompress MB/s':>16}")
    for kind, level in [("", 0), ("GZIP", 1), ("GZIP", 6), ("GZIP", 9), ("ZLIB", 1),
                        ("ZLIB", 6)]:
        path, best, squeeze = folder / "choice.tfrecord", float("inf"), float("inf")
        for _ in range(3):  # the best of three: the machine is shared
            timer, start = StageTimer(), time.perf_counter()
            with TFRecordWriter(path, kind, level=level or 9, timer=timer) as writer:
                writer.write_many(records)
            best = min(best, time.perf_counter() - start)
            squeeze = min(squeeze, timer.seconds.get("compress", float("inf")))
        seconds = best
        data = path.read_bytes()
        unpack = min(_seconds(zlib.decompress, data, 31 if kind == "GZIP" else 15)
                     for _ in range(3)) if kind else 0.0
        name = f"{kind or 'none'}{f'-{level}' if kind else ''}"
        squeezed = f"{raw / 1e6 / squeeze:.0f}" if kind else "-"
        unpacked = f"{raw / 1e6 / unpack:.0f}" if kind else "-"
        print(f"{name:<10} {len(data) / raw:>7.2f} {squeezed:>14} {seconds:>8.2f} "
              f"{1e6 * seconds / len(records):>8.1f} {unpacked:>16}")
        path.unlink()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000, help="the smallest size")
    parser.add_argument("--sizes", default="", help="larger sizes, e.g. 200000,2000000")
    parser.add_argument("--write-up-to", type=int, default=20000,
                        help="convert end to end (writing shards) up to this size; larger "
                             "sizes are planned only")
    parser.add_argument("--workers", default="1,2", help="worker counts to convert with")
    parser.add_argument("--profile", action="store_true",
                        help="also a cProfile run of one worker's convert at each size written")
    parser.add_argument("--plan-cells", type=int, default=7_000_000,
                        help="the screen size to plan peak RSS for")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder holding an earlier tfrecords_tools (e.g. from `git "
                             "archive <commit> tfrecords_tools | tar -x -C DIR`): its 1-worker "
                             "convert is measured beside this one's")
    parser.add_argument("--repeats", type=int, default=0,
                        help="with --baseline: also convert with each code this many times, "
                             "alternately, at the smallest size, and print the medians")
    parser.add_argument("--sample", type=Path, default=None,
                        help="an existing sample-data folder (else one of 2,000 cells is made)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the replicated tables and outputs (else a temporary "
                             "one; 2M cells need ~15 GB)")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]

    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.work))
    sizes = [args.cells] + [int(s) for s in args.sizes.split(",") if s]
    rows, ones = [], {}
    try:
        sample = sample_folder(args.sample, root, 2000)
        for size in sizes:
            cp_dir = replicate(sample / "cellprofiler", root / f"cp{size}", size)
            n_fields = len(pd.read_csv(cp_dir / "Image.csv", usecols=["ImageNumber"]))
            one = measure_size(size, cp_dir, root, args, rows, size == sizes[0])
            if one:
                ones[size] = one
            if size != sizes[0]:
                shutil.rmtree(cp_dir, ignore_errors=True)
            print(f"... {size} cells ({n_fields} fields) done", file=sys.stderr, flush=True)
        floor = rows[0][2]
        print_rows(rows, sizes[0] / floor["seconds"])
        print(f"\nThe sample's tables repeated to each size (2,000 cells per copy, 84 fields of "
              f"~24 cells, 656 columns per cell in two tables); {os.cpu_count()} CPUs, load "
              f"average {os.getloadavg()[0]:.1f} at the end. The floor is measured at the "
              "smallest size; per cell it is the same at every size.")
        if ones:
            print_stages(ones)
        print_plan(rows, args.plan_cells)
        if (root / "shard.tfrecord").exists():
            compression_table(root / "shard.tfrecord", root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
