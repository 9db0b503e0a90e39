"""evaluate's minutes per 1,000 cells, stage by stage, beside another version of the code.

Runs `cp2image-tf evaluate MODEL DATA OUT --max-cells N` (with the demo's --reference-cells 1000
--train-cells 300, and --moa-column Metadata_MoA where the data has it) in a fresh process,
--repeats times with this code and, alternately, with --baseline's: a folder holding an earlier
checkout's packages, e.g. `git archive <commit> cp2image_tf tfrecords_tools cli | tar -x -C DIR`.
Prints each run's wall seconds and minutes per 1,000 cells, report.json's time by stage (the
median run of each code) and CPU seconds, then compares every run's report.json with the first's,
number by number, leaving out the timing: evaluate's results must not depend on how fast it ran.

`--split train` reaches 1,000 cells on the sample (its test split has 326): which cells are
drawn does not change what evaluate does with them, only the numbers it reports.

    python benchmarks/bench_evaluate.py MODEL DATA [--cells 1000] [--split test]
        [--baseline DIR] [--repeats 1] [--workers 2]
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The evaluate command, after saying which cp2image_tf it imported (on stderr's first line).
RUN = ("import sys, cp2image_tf; print(cp2image_tf.__file__, file=sys.stderr); "
       "from cli.main import main; sys.argv[0] = 'cp2image-tf'; main()")


def evaluate(model: Path, data: Path, out: Path, args, code: Path | None) -> dict:
    """One evaluate in a fresh process: its report.json, with the wall seconds of the command."""
    manifest = json.loads((data / "manifest.json").read_text())
    command = [sys.executable, "-P", "-c", RUN, "evaluate", str(model), str(data), str(out),
               "--max-cells", str(args.cells), "--split", args.split, "--reference-cells", "1000",
               "--train-cells", "300", "--workers", str(args.workers), "--quiet", "--overwrite"]
    if "Metadata_MoA" in manifest.get("treatments", {}).get("metadata", {}):
        command += ["--moa-column", "Metadata_MoA"]
    path = ([str(code)] if code else []) + sys.path
    start = time.perf_counter()
    # -P: not the current folder first on the path, where a checkout would shadow `code`
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    imported = Path(result.stderr.splitlines()[0].strip()).resolve()
    if code and not imported.is_relative_to(Path(code).resolve()):
        raise RuntimeError(f"the --baseline run imported {imported}, not {code}'s")
    report = json.loads((out / "report.json").read_text())
    report["_wall"] = wall
    return report


def differences(a, b, path="") -> list[tuple[str, object, object]]:
    """(path, a's value, b's value) wherever two reports differ, timing left out."""
    if "timing" in path or path.endswith("seconds") or path.endswith("_wall"):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in
                (differences(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b
                 else [(f"{path}/{k}", a.get(k), b.get(k))])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))
    return [] if same else [(path, a, b)]


def summary(diffs: list) -> str:
    """The differing values grouped by their name (the last key of the path), each with its
    largest relative difference where both are numbers."""
    groups = {}
    for path, a, b in diffs:
        groups.setdefault(path.rsplit("/", 1)[-1].split("[")[0], []).append((a, b))
    lines = []
    for name, pairs in groups.items():
        rel = [abs(a - b) / max(abs(a), abs(b)) for a, b in pairs
               if isinstance(a, (int, float)) and isinstance(b, (int, float)) and (a or b)]
        lines.append(f"{name}: {len(pairs)} values" + (f", largest relative difference "
                                                       f"{max(rel):.1e}" if rel else ""))
    return "\n  ".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an exported model (or a run folder)")
    parser.add_argument("data", type=Path, help="its converted dataset")
    parser.add_argument("--cells", type=int, default=1000, help="evaluate's --max-cells")
    parser.add_argument("--split", default="test", help="evaluate's --split")
    parser.add_argument("--workers", type=int, default=2, help="evaluate's --workers")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder holding an earlier version's cp2image_tf, "
                             "tfrecords_tools and cli, run alternately with this one")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each code")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    codes = [("this code", None)] + ([("--baseline code", args.baseline)] if args.baseline
                                     else [])
    runs = {name: [] for name, _ in codes}
    try:
        for k in range(args.repeats):
            for name, code in codes[::-1] if k % 2 else codes:
                runs[name].append(evaluate(args.model, args.data, root / "out", args, code))
                shutil.rmtree(root / "out", ignore_errors=True)
                print(f"... {name}, run {k + 1}: {runs[name][-1]['_wall']:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nevaluate {args.model} {args.data} --split {args.split} --max-cells {args.cells} "
          f"--workers {args.workers}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print(f"{'code':<16} {'command s':>10} {'evaluate s':>11} {'min/1,000 cells':>16} "
          f"{'main CPU s':>11} {'workers CPU s':>14} {'crops':>7}")
    median = {}
    for name, reports in runs.items():
        for report in reports:
            t = report["timing"]
            workers = sum(t.get("in_workers", {}).values())
            print(f"{name:<16} {report['_wall']:>10.1f} {t['seconds']:>11.1f} "
                  f"{t['seconds_per_1000_cells'] / 60:>16.2f} {t.get('cpu_seconds', 0):>11.1f} "
                  f"{workers:>14.1f} {t.get('measured_crops', 0):>7}")
        median[name] = sorted(reports, key=lambda r: r["timing"]["seconds"])[len(reports) // 2]
    names = list(median)
    stages = list(dict.fromkeys(s for r in median.values() for s in r["timing"]["stages"]))
    print(f"\nreport.json's timing.stages (wall seconds), the median run of each:\n"
          f"{'stage':<16}" + "".join(f"{n:>18}" for n in names))
    for stage in stages:
        print(f"{stage:<16}" + "".join(f"{median[n]['timing']['stages'].get(stage, 0):>18.1f}"
                                        for n in names))
    print(f"{'total':<16}" + "".join(f"{median[n]['timing']['seconds']:>18.1f}" for n in names))
    if len(names) == 2:
        a, b = (median[n]["timing"]["seconds"] for n in names)
        print(f"\nthis code takes {a / b:.2f} of the baseline's time")

    first = runs["this code"][0]
    found = [(name, k, differences(first, report)) for name, reports in runs.items()
             for k, report in enumerate(reports)]
    if all(not d for _, _, d in found):
        print(f"\nreport.json: every run's the same as the first's but for timing "
              f"({sum(len(r) for r in runs.values())} runs)")
    for name, k, diffs in found:
        if diffs:
            print(f"\nreport.json of {name}, run {k + 1}: {len(diffs)} values differ from the "
                  f"first run's:\n  {summary(diffs)}")


if __name__ == "__main__":
    main()
