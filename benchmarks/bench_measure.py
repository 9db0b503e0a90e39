"""Per-module cost of cp2image_tf.measuring.measure on sample-data fields (512x512, ~24 cells, 3 channels).

Prints CPU milliseconds per cell (its nucleus and its cell measured, in all three channels) for
each module alone, then for DEFAULT_MODULES and ALL_MODULES together. Each figure is the
smallest of `--repeats` rounds, run in turn, so that other processes on the machine disturb it
least. CPU time of this one process: the measurement code is single-threaded.

    python benchmarks/bench_measure.py [FIELDS] [REPEATS]
"""
import sys
import time
import warnings

import numpy as np

from cp2image_tf.measuring import measure
from cp2image_tf.sampledata import CHANNELS, TREATMENTS, draw_field


def main(n_fields=7, repeats=3):
    warnings.simplefilter("ignore", RuntimeWarning)
    fields = []
    for i in range(n_fields):
        images, nuclei, cells, _ = draw_field(24, TREATMENTS[i % len(TREATMENTS)].name, seed=i)
        fields.append(({ch: images[ch] / 65535.0 for ch in CHANNELS},
                       {"Nuclei": nuclei.astype(np.int32), "Cells": cells.astype(np.int32)}))
    n_cells = sum(int(masks["Nuclei"].max()) for _, masks in fields)
    measure.measure_objects(*fields[0], measure.ALL_MODULES)  # imports, numba cache

    def cost(modules):
        start = time.process_time()
        for images, masks in fields:
            measure.measure_objects(images, masks, modules)
        return 1000 * (time.process_time() - start) / n_cells

    sets = {name: [name] for name in measure.MODULES}
    sets.update(DEFAULT_MODULES=measure.DEFAULT_MODULES, ALL_MODULES=measure.ALL_MODULES)
    best = {label: min(cost(modules) for _ in range(1)) for label, modules in sets.items()}
    for _ in range(repeats - 1):
        for label, modules in sets.items():
            best[label] = min(best[label], cost(modules))
    print(f"{n_fields} fields, {n_cells} cells, backend {measure.BACKEND}; "
          "CPU ms per cell (Nuclei + Cells, 3 channels):")
    for label, ms in best.items():
        extra = f"  (2,000 cells: {2 * ms:.0f} s)" if label.endswith("MODULES") else ""
        print(f"  {label:20s} {ms:6.1f}{extra}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
