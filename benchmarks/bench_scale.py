"""Scaling out: cells/s of convert and featurize in one process and on a Dask LocalCluster.

Side by side in one run, on one sample screen:
  - convert (shards of --shard-size cells) and featurize (parts of --part-size image sets):
    one process, a LocalCluster with 1 worker process and with 2 (127.0.0.1); the cluster is
    started before the clock starts (its start-up is printed on its own line)
  - the scheduling overhead per part: a no-op part's round trip through the scheduler
  - the driver's serial share of convert (the streaming planner: reading the tables,
    planning, spilling the kept cells to the plan's segments)
and from these an estimate of the wall time of 1 million cells on 100 workers.

This machine gives about one core of throughput: two workers are not twice as fast here.

    python benchmarks/bench_scale.py [--cells 1000] [--sample DIR]
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd

from _replicate import replicate
from _sample import sample_folder

CHANNELS = ["DNA", "Tubulin", "Actin"]


def noop(task):
    return task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--sample", type=Path, default=None,
                        help="an existing sample-data folder (else one is made)")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--part-size", type=int, default=2)
    parser.add_argument("--noop-parts", type=int, default=300)
    parser.add_argument("--plan-cells", type=int, default=20000,
                        help="the sample's tables repeated to this many cells, for the "
                             "planner's cost per cell")
    args = parser.parse_args()

    from tfrecords_tools.parts import dask_client, run_parts
    from cp2image_tf.measuring.featurize import featurize
    from tfrecords_tools.convert import ConvertConfig, convert, plan_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        sample = sample_folder(args.sample, root, args.cells)
        cp_dir = sample / "cellprofiler"
        n_cells = len(pd.read_csv(cp_dir / "Nuclei.csv", usecols=["ObjectNumber"]))
        n_sets = len(pd.read_csv(sample / "load_data.csv"))

        def convert_config(out, **kw):
            return ConvertConfig(input=str(cp_dir), out_dir=str(root / out),
                                 channels=CHANNELS, objects=["Nuclei", "Cells"],
                                 split_by=["Metadata_Plate", "Metadata_Well"],
                                 shard_size=args.shard_size, **kw)

        warm_sets = 6  # every phenotype of the sample: every code path compiled
        overhead, startup, warmup = {}, {}, {}
        fz = dict(channels=CHANNELS, objects=["Nuclei", "Cells"], part_size=args.part_size,
                  progress=False)

        def plan_once(name, tables=cp_dir):
            work = root / name
            work.mkdir()
            config = convert_config("plan")
            config.input = str(tables)
            start = time.perf_counter()
            plan = plan_dataset(config, work)
            return time.perf_counter() - start, plan["counts"]["cells"] + plan["rejects"]["count"]

        plan_once("plan0")  # once to import what planning needs
        plan_seconds, _ = plan_once("plan1")
        # The planner's cost per cell on a larger screen (the sample's tables repeated, the same
        # TIFFs): what 1M cells cost, without the sample's fixed costs spread over 1,000 cells.
        big_seconds, big_cells = plan_once("plan2", replicate(cp_dir, root / "big",
                                                              args.plan_cells))
        plan_cell = big_seconds / big_cells

        one_set = sample / ".bench_scale_one_set.csv"
        pd.read_csv(sample / "load_data.csv").head(warm_sets).to_csv(one_set, index=False)

        def warm(**kw):
            out = root / f"warm{time.perf_counter_ns()}"
            featurize(one_set, out, **dict(fz, part_size=1), **kw)
            shutil.rmtree(out)

        rows = []
        start = time.perf_counter()
        warm()
        warmup[0] = time.perf_counter() - start
        start = time.perf_counter()
        m = convert(convert_config("c_single"), progress=False)
        rows.append(("convert", "one process", time.perf_counter() - start, len(m["shards"])))
        start = time.perf_counter()
        featurize(sample / "load_data.csv", root / "f_single", **fz)
        rows.append(("featurize", "one process", time.perf_counter() - start,
                     -(-n_sets // args.part_size)))
        for workers in (1, 2):
            start = time.perf_counter()
            with dask_client("local", workers, quiet=True) as client:  # as --scheduler local
                startup[workers] = time.perf_counter() - start
                start = time.perf_counter()
                warm(client=client)  # imports and numba's compiling: once per worker process
                warmup[workers] = time.perf_counter() - start
                start = time.perf_counter()
                m = convert(convert_config(f"c_{workers}"), progress=False, client=client)
                rows.append(("convert", f"LocalCluster, {workers} worker(s)",
                             time.perf_counter() - start, len(m["shards"])))
                start = time.perf_counter()
                featurize(sample / "load_data.csv", root / f"f_{workers}", client=client, **fz)
                rows.append(("featurize", f"LocalCluster, {workers} worker(s)",
                             time.perf_counter() - start, -(-n_sets // args.part_size)))
                tasks = [[k] for k in range(args.noop_parts)]
                start = time.perf_counter()
                list(run_parts(noop, tasks, [f"noop-{k}" for k in range(len(tasks))], cells=len,
                               client=client, progress=False))
                overhead[workers] = (time.perf_counter() - start) / len(tasks)
        same = all((root / "f_single" / n).read_bytes() == (root / f"f_{w}" / n).read_bytes()
                   for w in (1, 2) for n in ("Image.csv", "Nuclei.csv", "Cells.csv"))

        print(f"Sample screen: {n_cells} cells in {n_sets} image sets; convert shards of "
              f"<= {args.shard_size} cells, featurize parts of {args.part_size} image sets "
              f"(default modules). Machine: {os.cpu_count()} cores.")
        print(f"{'stage':<10} {'how':<26} {'seconds':>8} {'cells/s':>9} {'parts':>6} "
              f"{'s/part':>7} {'vs one':>7}")
        base = {}
        for stage, how, seconds, parts in rows:
            base.setdefault(stage, seconds)
            print(f"{stage:<10} {how:<26} {seconds:8.2f} {n_cells / seconds:9.0f} {parts:6d} "
                  f"{seconds / parts:7.3f} {base[stage] / seconds:6.2f}x")
        for workers in (1, 2):
            print(f"LocalCluster with {workers} worker(s): start-up {startup[workers]:.1f} s "
                  f"(once per run); scheduling overhead {overhead[workers] * 1000:.1f} ms per "
                  f"part (no-op part, round trip)")
        print(f"Worker warm-up (imports, numba compiling; excluded above, once per process): "
              f"one process {warmup[0]:.1f} s, LocalCluster 1 worker {warmup[1]:.1f} s, "
              f"2 workers {warmup[2]:.1f} s")
        print(f"featurize CSVs identical on the cluster: {same}")

        # Estimate: 1M cells on 100 workers, per-cell work from the one-process runs, the
        # part overhead from the 1-worker no-op round trip (scheduler latency per part,
        # overlapped across workers), the driver's planning serial.
        cells, workers = 1_000_000, 100
        per_part = overhead[1]
        conv_single = rows[0][2] - plan_seconds  # the parts' share of the one-process run
        conv_cell = conv_single / n_cells
        fz_cell = rows[1][2] / n_cells
        conv_parts = cells / min(1000, args.shard_size * 20)
        fz_parts = cells / (n_cells / n_sets * args.part_size)
        plan_1m = plan_cell * cells
        conv_est = plan_1m + (cells * conv_cell + conv_parts * per_part) / workers
        fz_est = (cells * fz_cell + fz_parts * per_part) / workers
        print(f"Estimate, 1M cells on {workers} workers (per-cell cost from the one-process "
              f"run, {per_part * 1000:.1f} ms overhead per part, input I/O scaling with "
              "workers):")
        print(f"  convert:   {conv_est / 60:6.1f} min = driver plan {plan_1m / 60:.1f} min "
              f"(serial, streaming; {plan_cell * 1e6:.0f} us/cell on {big_cells:,} cells, "
              f"{plan_seconds / n_cells * 1e6:.0f} on {n_cells:,}) + "
              f"{cells:,} x {conv_cell * 1000:.2f} ms + {conv_parts:,.0f} shards of 1000 x "
              f"{per_part * 1000:.1f} ms, / {workers}")
        print(f"  featurize: {fz_est / 60:6.1f} min = {cells:,} x {fz_cell * 1000:.1f} ms + "
              f"{fz_parts:,.0f} parts x {per_part * 1000:.1f} ms, / {workers}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if "one_set" in locals():
            one_set.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
