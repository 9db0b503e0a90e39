"""Input pipeline throughput: the TFRecord reader vs one np.load per crop.

Makes N synthetic cells (453 float32 features, 68x68x3 uint16 crops) as .npy
files plus a Parquet table, converts them with `convert --table`, then times,
side by side in one run:
  - np.load of one file per crop, stacked into batches (the published code's way)
  - make_dataset(...) float32 crops in [0, 1] (dataset-level scaling), batch 104
  - make_dataset(..., raw_crops=True): uint16 crops, scaling left to the model step
  - make_dataset(..., scaling="crop_max"): the published per-crop max scaling
Prints crops/s and the ratio to the np.load loader.

    python benchmarks/bench_input.py [--cells 20000] [--seconds 10]
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd


def make_cells(root: Path, n: int, features: int = 453, size: int = 68) -> Path:
    rng = np.random.default_rng(0)
    crops = root / "crops"
    crops.mkdir(parents=True)
    table = {"Metadata_ImageNumber": np.arange(n) // 20 + 1,
             "Metadata_ObjectNumber": np.arange(n) % 20 + 1,
             "Metadata_Treatment": [f"T{i % 8}" for i in range(n)],
             "Metadata_CropFile": [f"crops/{i:06d}.npy" for i in range(n)]}
    values = rng.normal(size=(n, features)).astype(np.float32)
    for j in range(features):
        table[f"Nuclei_Intensity_Feature{j:03d}_DNA"] = values[:, j]
    for i in range(n):
        np.save(crops / f"{i:06d}.npy", rng.integers(0, 40000, (size, size, 3), dtype=np.uint16))
    path = root / "cells.parquet"
    pd.DataFrame(table).to_parquet(path)
    return path


def npload_rate(paths, features, batch: int, seconds: float) -> float:
    """Crops/s of a loop that np.load's each crop file and stacks a batch (published way)."""
    rng = np.random.default_rng(1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = rng.integers(0, len(paths), batch)
        crops = np.stack([np.load(paths[i]) for i in idx]).astype(np.float32)
        crops /= crops.max(axis=(1, 2), keepdims=True)
        _ = features[idx]
        done += batch
    return done / (time.perf_counter() - start)


def reader_rate(data_dir, batch: int, seconds: float, **kwargs) -> float:
    from tfrecords_tools.reader import make_dataset

    iterator = iter(make_dataset(data_dir, "train", batch, **kwargs))
    for _ in range(20):  # warm-up: fill shuffle buffers and prefetch
        next(iterator)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        features, crops = next(iterator)
        done += int(crops.shape[0])
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=104)
    args = parser.parse_args()

    from tfrecords_tools.convert import ConvertConfig, convert

    root = Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        table = make_cells(root, args.cells)
        start = time.perf_counter()
        convert(ConvertConfig(input=str(table), out_dir=str(root / "data"), table=True,
                              channels=["DNA", "Tubulin", "Actin"], split=(1.0, 0.0, 0.0),
                              shard_size=2500), progress=False)
        print(f"converted {args.cells} cells in {time.perf_counter() - start:.1f} s")
        paths = sorted(str(p) for p in (root / "crops").glob("*.npy"))
        feats = pd.read_parquet(table).filter(like="Nuclei_").to_numpy(np.float32)
        rows = [("np.load one file per crop (published)", npload_rate(paths, feats, args.batch, args.seconds))]
        rows.append(("make_dataset, float32 [0,1], dataset scaling",
                     reader_rate(root / "data", args.batch, args.seconds)))
        rows.append(("make_dataset, raw uint16 (scale in model step)",
                     reader_rate(root / "data", args.batch, args.seconds, raw_crops=True)))
        rows.append(("make_dataset, per-crop max scaling",
                     reader_rate(root / "data", args.batch, args.seconds, scaling="crop_max")))
        base = rows[0][1]
        print(f"\n{'loader':<50} {'crops/s':>9} {'x np.load':>9}")
        for name, rate in rows:
            print(f"{name:<50} {rate:>9.0f} {rate / base:>9.1f}")
        print(f"\n{args.cells} cells, batch {args.batch}, {os.cpu_count()} CPUs, "
              f"{args.seconds:.0f} s per loader")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
