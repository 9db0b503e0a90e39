"""How well re-measuring crops reproduces CellProfiler's own values on a real screen: the ceiling
every generator is judged under, and the nearest-neighbour lookup's share, per module.

Converts the BBBC013 Wortmannin half (../shared/data/bbbc013_wortmannin.tar.xz, or --screen for
an extracted ExportToSpreadsheet folder of any screen with --channels/--measured-as/--illum)
three ways: raw crops named after their files; raw crops with --measured-as; corrected crops
(--illum). Then re-measures real test crops and their nearest training neighbours with
`evaluate`'s segmentation, and, for the last dataset, with each crop's own Otsu threshold and no
declumping (what evaluate did before). Prints, per module, the share of CellProfiler's features
reproduced at r >= 0.7 and r >= 0.9, and how many features could be re-measured.

    python benchmarks/bench_ceiling.py [--max-cells 400] [--reference-cells 3000] [--out DIR]
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp2image_tf import metrics  # noqa: E402
from cp2image_tf.evaluation.neighbours import nearest_neighbours  # noqa: E402
from cp2image_tf.measuring.remeasure import (Segmentation, dataset_segmentation,  # noqa: E402
                                             plan_measurement, remeasure)
from tfrecords_tools.manifest import load_manifest, measured_names, treatment_cells  # noqa: E402
from tfrecords_tools.reader import sample_cells, stratified_quota  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "bbbc013_wortmannin.tar.xz"
CONVERT = ["--objects", "Nuclei,Cells", "--channels", "rawGFP,rawDNA", "--split-by",
           "Metadata_Well", "--treatment-column", "Metadata_Compound,Metadata_SBS_Doses"]
NAMES = ["--measured-as", "rawGFP=CorrGreen,rawDNA=CorrBlue"]
ILLUM = ["--illum", "rawGFP=IllumGFP,rawDNA=IllumDNA"]


def convert(screen: Path, out: Path, extra) -> Path:
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "cli", "convert", str(screen), str(out), *CONVERT,
                        *extra, "--overwrite", "--quiet"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return out


def shares(inputs: pd.DataFrame, measured: dict) -> pd.DataFrame:
    """Per module and method: features, share at r >= 0.7 and r >= 0.9."""
    rows = []
    for method, frame in measured.items():
        r = metrics.feature_correlations(inputs, frame)["pearson"]
        modules = pd.Series([metrics.module_of(f) for f in r.index], index=r.index)
        for module in ["all"] + sorted(set(modules)):
            picked = r if module == "all" else r[modules == module]
            rows.append({"method": method, "module": module, "features": len(picked),
                         "r>=0.7": float((picked >= 0.7).mean()),
                         "r>=0.9": float((picked >= 0.9).mean()),
                         "median r": float(picked.median())})
    return pd.DataFrame(rows)


def run_one(data: Path, label: str, args, variants: bool) -> pd.DataFrame:
    manifest = load_manifest(data)
    names = manifest["features"]["names"]
    plan = plan_measurement(names, measured_names(manifest))
    cells = sample_cells(data, manifest, "test",
                         stratified_quota(treatment_cells(manifest, "test"), args.max_cells),
                         seed=0)
    reference = sample_cells(data, manifest, "train",
                             stratified_quota(treatment_cells(manifest, "train"),
                                              args.reference_cells), seed=1)
    neighbour = nearest_neighbours(cells["raw"], reference["raw"], manifest, "standard")
    settings, origin = dataset_segmentation(manifest, reference["crops"], "dataset", plan.objects,
                                            reference["raw"])
    channels = measured_names(manifest)
    inputs = pd.DataFrame(cells["raw"], columns=names)[plan.measurable]
    measured = {"ceiling": remeasure(cells["crops"], plan, channels, workers=2,
                                     segmentation=settings),
                "nearest neighbour": remeasure(reference["crops"][neighbour], plan, channels,
                                               workers=2, segmentation=settings)}
    if variants:
        measured["ceiling, per-crop Otsu, no declumping"] = remeasure(
            cells["crops"], plan, channels, workers=2,
            segmentation=Segmentation(dna=settings.dna, cell_threshold=settings.cell_threshold))
        measured["ceiling, no declumping"] = remeasure(
            cells["crops"], plan, channels, workers=2,
            segmentation=Segmentation(dna=settings.dna, cell_threshold=settings.cell_threshold,
                                      nucleus_threshold=settings.nucleus_threshold))
    print(f"\n## {label}: {len(plan.measurable)} of {len(names)} features re-measured; "
          f"{len(inputs)} test cells of {len(set(cells['treatments']))} treatments")
    reasons = pd.Series(plan.unmeasurable).value_counts()
    for reason, count in reasons.items():
        print(f"   not re-measured ({count}): {reason}")
    print(f"   segmentation: nucleus threshold {settings.nucleus_threshold:.4f} "
          f"({origin['nucleus_threshold']}); declumping: {origin['declumping']}")
    table = shares(inputs, measured)
    table.insert(0, "dataset", label)
    print(table.drop(columns="dataset").to_string(index=False, float_format="%.2f"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--screen", type=Path, default=None,
                        help="an extracted BBBC013 Wortmannin folder (default: extract "
                             f"{ARCHIVE.name})")
    parser.add_argument("--max-cells", type=int, default=400)
    parser.add_argument("--reference-cells", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None, help="keep datasets here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_ceiling-"))
    screen = args.screen
    if screen is None:
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(out, filter="data")
        screen = out / "bbbc013_wortmannin"
    tables = []
    for label, extra, variants in (("raw crops, --measured-as", NAMES, False),
                                   ("corrected crops, --measured-as --illum", NAMES + ILLUM,
                                    True)):
        data = convert(screen, out / label.split(",")[0].replace(" ", "_"), extra)
        tables.append(run_one(data, label, args, variants))
    pd.concat(tables).to_csv(out / "ceiling.csv", index=False)
    print(f"\nEvery figure: {out / 'ceiling.csv'}")


if __name__ == "__main__":
    main()
