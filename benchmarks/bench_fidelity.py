"""The figure this project lives by: how much of a cell's CellProfiler profile its drawn picture
carries, for each model at the same time budgets, beside the nearest-neighbour lookup, the mean
image and the real-crop ceiling, all measured in one run.

For each model and budget: `fit --time-limit BUDGET`, `export`, then `evaluate` on the test
split (--max-cells, --reference-cells, --train-cells, --moa-column Metadata_MoA); with --unseen
also the unseen-treatment protocol (data converted with --split-by Metadata_Treatment). Prints
one table per protocol: share of re-measured features at r >= 0.7 (all and per module),
treatment and MoA accuracy, mean-profile r, KID, the median controllability gain (correlated
features moving too, and the feature alone; the lookup's on the nearest neighbour's row),
training images/s and minutes.

    python benchmarks/bench_fidelity.py [--sample DIR] [--models exemplar,film,published]
        [--budgets 5m,30m] [--unseen] [--max-cells 300] [--out DIR]

The issue's protocol is the defaults with --unseen (about two and a half hours on two CPU
cores); `--budgets 5m` is the demo's budget alone.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sample import sample_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CLI = [sys.executable, "-m", "cli"]
BASELINES = ("nearest neighbour", "mean image", "ceiling")


def run(*args) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def convert(sample: Path, out: Path, split_by: str) -> Path:
    if not (out / "manifest.json").is_file():
        run("convert", sample / "cellprofiler", out, "--objects", "Nuclei,Cells",
            "--channels", "DNA,Tubulin,Actin", "--split-by", split_by, "--overwrite")
    return out


def train_and_evaluate(data: Path, work: Path, model: str, budget: str, args) -> dict:
    """fit for the budget, export, evaluate; the report's figures and the training's."""
    name = f"{model}-{budget}"
    run_dir, model_dir, eval_dir = work / f"run-{name}", work / f"model-{name}", work / f"eval-{name}"
    start = time.perf_counter()
    if not (run_dir / "history.csv").is_file() or not (model_dir / "1").is_dir():
        run("fit", data, run_dir, "--model", model, "--time-limit", budget, "--steps", 10 ** 6,
            "--validate-every", 500, "--checkpoint-every", 500, "--log-every", 25, "--quiet")
        run("export", run_dir, model_dir)  # best/: the published model's lowest validation MSE, else the latest validated
    minutes = (time.perf_counter() - start) / 60
    run("evaluate", model_dir, data, eval_dir, "--max-cells", args.max_cells,
        "--reference-cells", args.reference_cells, "--train-cells", args.train_cells,
        "--moa-column", "Metadata_MoA", "--overwrite", "--quiet")
    report = json.loads((eval_dir / "report.json").read_text())
    import pandas as pd

    history = pd.read_csv(run_dir / "history.csv")
    rate = history["images_per_s"].dropna()
    return {"report": report, "images_per_s": float(rate.iloc[len(rate) // 2:].median()),
            "steps": int(history["step"].max()), "minutes": minutes, "eval_dir": str(eval_dir)}


def rows_of(result: dict, label: str) -> list[dict]:
    """One table row for the model and, from its report, one per baseline."""
    report = result["report"]
    methods = report["headline"]["all"]["methods"]
    rows = []
    for method in ("model", *BASELINES):
        figures = methods.get(method)
        if figures is None:
            continue
        row = {"method": label if method == "model" else method,
               "r>=0.7": figures["fraction_r"], "median r": figures["median_r"]}
        for module, entry in report["modules"].items():
            if module != "all":  # the same as r>=0.7
                row[module] = entry[method]["fraction"]
        row.update({"treatment acc": figures.get("treatment_accuracy"),
                    "MoA acc": figures.get("moa_accuracy"), "profile r": figures["profile_r"],
                    "KID": figures["kid"]})
        row.update(gains_of(report.get("controllability") or {}, method))
        if method == "model":
            row.update({"img/s": result["images_per_s"], "steps": result["steps"],
                        "minutes": result["minutes"]})
        rows.append(row)
    return rows


def gains_of(section: dict, method: str) -> dict:
    """The controllability section's median gains: the model's, correlated and alone, on its
    row; the lookup's (the nearest training cell at each step) on the nearest neighbour's."""
    summary = section.get("summary")
    if not summary:
        return {}
    if method == "model":
        return {"gain corr": summary["correlated"]["gain"], "gain alone": summary["alone"]["gain"]}
    if method == "nearest neighbour":
        return {"gain corr": summary["lookup"]["gain"]}
    return {}


def print_table(title: str, rows: list[dict]) -> None:
    """A Markdown table; a baseline measured for several models is shown once."""
    seen, kept = set(), []
    for row in rows:
        if row["method"] not in seen:
            seen.add(row["method"])
            kept.append(row)
    columns = list(dict.fromkeys(k for row in kept for k in row))

    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in kept:
        print("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=None, help="an existing sample-data folder")
    parser.add_argument("--models", default="exemplar,film,published")
    parser.add_argument("--budgets", default="5m,30m")
    parser.add_argument("--unseen", action="store_true",
                        help="also the unseen-treatment protocol (the first model, the last budget)")
    parser.add_argument("--max-cells", type=int, default=300)
    parser.add_argument("--reference-cells", type=int, default=2000)
    parser.add_argument("--train-cells", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="keep runs and reports here")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    sample = sample_folder(args.sample, work, cells=2000)
    wells = convert(sample, work / "data-wells", "Metadata_Plate,Metadata_Well")
    rows = []
    for budget in args.budgets.split(","):
        for model in args.models.split(","):
            result = train_and_evaluate(wells, work, model, budget, args)
            rows += rows_of(result, f"{model} {budget}")
    print_table("Test split (held-out wells)", rows)
    if args.unseen:
        unseen = convert(sample, work / "data-treatments", "Metadata_Treatment")
        budget, model = args.budgets.split(",")[-1], args.models.split(",")[0]
        result = train_and_evaluate(unseen, work / "unseen", model, budget, args)
        print_table("Unseen treatments (--split-by Metadata_Treatment)",
                    rows_of(result, f"{model} {budget}"))
    print(f"\nRuns and reports: {work}")


if __name__ == "__main__":
    main()
