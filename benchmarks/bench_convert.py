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
  - convert end to end with 1 and 2 workers (reading the tables, planning, worker start-up,
    writing) at sizes up to --write-up-to
Prints cells/s, each one's speed as a fraction of the floor's and the peak RSS.

    python benchmarks/bench_convert.py --cells 20000 [--sizes 200000,2000000] [--sample DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd

from _replicate import replicate
from _sample import sample_folder

CHANNELS = ["DNA", "Tubulin", "Actin"]
SPLIT_BY = ["Metadata_Plate", "Metadata_Well"]

# Run in a child process: one measurement, its peak RSS (with its own children's) as JSON.
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import pandas as pd, tifffile
from tfrecords_tools.convert import ConvertConfig, convert, plan_dataset
kind, cp_dir, out, workers = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()  # imports done: the same for every measurement
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
        manifest = convert(config, progress=False)
        cells = manifest["counts"]["cells"] + manifest["counts"]["rejected"]
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "cells": cells, "peak_gb": peak / 1e6}))
""" % {"channels": CHANNELS, "split_by": SPLIT_BY}


def measure(kind: str, cp_dir: Path, out: Path, workers: int = 1, cells: int = 0) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(cp_dir), str(out),
                             str(workers), str(cells)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000, help="the smallest size")
    parser.add_argument("--sizes", default="", help="larger sizes, e.g. 200000,2000000")
    parser.add_argument("--write-up-to", type=int, default=20000,
                        help="convert end to end (writing shards) up to this size; larger "
                             "sizes are planned only")
    parser.add_argument("--sample", type=Path, default=None,
                        help="an existing sample-data folder (else one of 2,000 cells is made)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the replicated tables and outputs (else a temporary "
                             "one; 2M cells need ~15 GB)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.work))
    sizes = [args.cells] + [int(s) for s in args.sizes.split(",") if s]
    rows = []
    try:
        sample = sample_folder(args.sample, root, 2000)
        floor_rate = None
        for size in sizes:
            cp_dir = replicate(sample / "cellprofiler", root / f"cp{size}", size)
            n_fields = len(pd.read_csv(cp_dir / "Image.csv", usecols=["ImageNumber"]))
            if floor_rate is None:
                floor = measure("floor", cp_dir, root / "none")
                floor_rate = size / floor["seconds"]
                rows.append((size, "read every TIFF once (I/O floor)", floor))
                rows.append((size, "  the same + write the crops' bytes",
                             measure("floor+write", cp_dir, root / "bytes", cells=size)))
                (root / "bytes").unlink()
            rows.append((size, "plan (streaming)", measure("plan", cp_dir, root / f"plan{size}")))
            if size <= args.write_up_to:
                for workers in (1, 2):
                    rows.append((size, f"convert, {workers} worker(s)",
                                 measure("convert", cp_dir, root / f"out{size}-{workers}",
                                         workers)))
                    shutil.rmtree(root / f"out{size}-{workers}", ignore_errors=True)
            shutil.rmtree(root / f"plan{size}", ignore_errors=True)
            if size != sizes[0]:
                shutil.rmtree(cp_dir, ignore_errors=True)
            print(f"... {size} cells ({n_fields} fields) done", file=sys.stderr, flush=True)
        print(f"\n{'cells':>9} {'':<34} {'seconds':>8} {'cells/s':>9} {'us/cell':>8} "
              f"{'x floor':>8} {'peak RSS GB':>12}")
        for size, name, r in rows:
            rate = r["cells"] / r["seconds"] if r["cells"] else size / r["seconds"]
            print(f"{size:>9} {name:<34} {r['seconds']:>8.1f} {rate:>9.0f} "
                  f"{1e6 / rate:>8.1f} {rate / floor_rate:>8.2f} {r['peak_gb']:>12.2f}")
        print(f"\nThe sample's tables repeated to each size (2,000 cells per copy, 84 fields of "
              f"~24 cells, 656 columns per cell in two tables); {os.cpu_count()} CPUs. The "
              "floor is measured at the smallest size; per cell it is the same at every size.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
