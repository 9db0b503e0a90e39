"""convert throughput on the sample data, against the I/O floor of reading its TIFFs.

Side by side in one run:
  - the floor: read and decode every channel TIFF of every field once (what any
    converter must do), in one process
  - convert with 1 worker and with 2 workers, end to end (reading the CSV tables,
    planning, worker start-up, writing)
Prints cells/s and each one's speed as a fraction of the floor.

    python benchmarks/bench_convert.py [--cells 2000] [--sample DIR]
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd
import tifffile

from _sample import sample_folder

CHANNELS = ["DNA", "Tubulin", "Actin"]


def read_floor(cp_dir: Path) -> float:
    image = pd.read_csv(cp_dir / "Image.csv")
    start = time.perf_counter()
    for _, row in image.iterrows():
        for ch in CHANNELS:
            folder = Path(row[f"PathName_{ch}"])
            folder = folder if folder.is_absolute() else cp_dir / folder
            tifffile.imread(folder / row[f"FileName_{ch}"])
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--sample", type=Path, default=None,
                        help="an existing sample-data folder (else one is made)")
    args = parser.parse_args()

    from tfrecords_tools.convert import ConvertConfig, convert

    root = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        sample = sample_folder(args.sample, root, args.cells)
        cp_dir = sample / "cellprofiler"
        n_cells = len(pd.read_csv(cp_dir / "Nuclei.csv", usecols=["ObjectNumber"]))
        floor = read_floor(cp_dir)
        rows = [("read every TIFF once (I/O floor)", floor, n_cells)]
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = convert(ConvertConfig(input=str(cp_dir), out_dir=str(root / f"out{workers}"),
                                             channels=CHANNELS, objects=["Nuclei", "Cells"],
                                             split_by=["Metadata_Well"], workers=workers),
                               progress=False)
            rows.append((f"convert, {workers} worker(s)", time.perf_counter() - start,
                         manifest["counts"]["cells"]))
        print(f"\n{'':<36} {'seconds':>8} {'cells/s':>9} {'x floor speed':>14}")
        floor_rate = n_cells / floor
        for name, seconds, cells in rows:
            rate = cells / seconds
            print(f"{name:<36} {seconds:>8.2f} {rate:>9.0f} {rate / floor_rate:>14.2f}")
        print(f"\n{n_cells} cells in {len(pd.read_csv(cp_dir / 'Image.csv'))} fields, "
              f"{os.cpu_count()} CPUs. convert times are end to end: reading the CSV tables, planning, worker start-up, writing.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
