"""A large synthetic screen from the sample: its CellProfiler tables repeated, images shared.

Copy k of the sample's image sets gets ImageNumber + k x (image sets), Metadata_Plate
"<plate>-r<k>" (so --split-by Metadata_Plate,Metadata_Well groups grow with the screen) and the
same FileName_/PathName_ values: every copy points at the sample's TIFFs, none is re-drawn. The
object tables are rewritten as text (only the leading ImageNumber field changes), a copy at a
time, so memory stays small at any size.

    python benchmarks/_replicate.py SAMPLE_CELLPROFILER_DIR OUT_DIR --cells 2000000
"""
import argparse
import os
import shutil
from pathlib import Path

import pandas as pd


def replicate(cp_dir, out_dir, cells: int, objects=("Nuclei", "Cells")) -> Path:
    """`out_dir` holding Image.csv and the object tables of `cells` cells (whole copies of the
    sample, the last one cut short), PathName_ made absolute so the TIFFs are the sample's."""
    cp_dir, out_dir = Path(cp_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = pd.read_csv(cp_dir / "Image.csv")
    for column in [c for c in image.columns if c.startswith("PathName_")]:
        image[column] = [os.path.normpath(p if os.path.isabs(p) else str(cp_dir / p))
                         for p in image[column]]
    n_sets = int(image["ImageNumber"].max())
    per_copy = sum(1 for _ in open(cp_dir / f"{objects[0]}.csv")) - 1
    copies = -(-cells // per_copy)
    frames = []
    for k in range(copies):
        copy = image.copy()
        copy["ImageNumber"] += k * n_sets
        copy["Metadata_Plate"] = copy["Metadata_Plate"].astype(str) + f"-r{k}"
        frames.append(copy)
    pd.concat(frames).to_csv(out_dir / "Image.csv", index=False)
    for obj in objects:
        with open(cp_dir / f"{obj}.csv") as handle:
            header = handle.readline()
            if not header.startswith("ImageNumber,"):
                raise ValueError(f"{obj}.csv: ImageNumber must be the first column")
            rows = [line.split(",", 1) for line in handle]
        with open(out_dir / f"{obj}.csv", "w") as out:
            out.write(header)
            left = cells
            for k in range(copies):
                take = rows[:min(left, len(rows))]
                out.write("".join(f"{int(n) + k * n_sets},{rest}" for n, rest in take))
                left -= len(take)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cp_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cells", type=int, required=True)
    args = parser.parse_args()
    if args.out_dir.exists():
        shutil.rmtree(args.out_dir)
    replicate(args.cp_dir, args.out_dir, args.cells)


if __name__ == "__main__":
    main()
