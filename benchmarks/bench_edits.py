"""Where the exemplar model's edits draw fine lines rather than cells, and what they answer.

For each run (exemplar model), side by side on the same test cells: the edit each drawn cell
makes to its exemplar (the picture less the bank cell it starts from), its fine-line energy per
channel (root mean square of the edit less its 5 x 5 box blur: thin strokes score high, changes
of brightness or of a cell's extent over several pixels low), quantiles over the cells, and how
much more it varies across columns than across rows (above 1: vertical strokes). For the
channel with the most, the features whose asked change from the exemplar's profile goes with it
(Pearson r over the cells): what the strokes are drawn for.

    python benchmarks/bench_edits.py DATA RUN_DIR [RUN_DIR ...] [--cells 300] [--split test]
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp2image_tf.serving.export import load_run  # noqa: E402
from cp2image_tf.training.exemplar.bank import FEATURE_CLIP, bank_layer  # noqa: E402
from tfrecords_tools.reader import take_cells  # noqa: E402


def edits(run, data, cells, split):
    decoder, manifest, config, _ = load_run(run)
    feats, _ = take_cells(data, manifest, split, cells, seed=0, scaling=config.scaling,
                          normalization=config.normalization)[:2]
    feats = feats.astype("float32")
    exemplar, profile, _ = bank_layer(decoder)(feats, training=False)
    drawn = np.concatenate([decoder(feats[i:i + 50], training=False).numpy()
                            for i in range(0, len(feats), 50)])
    asked = np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP) - profile.numpy()
    return drawn - exemplar.numpy(), asked, manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    for run in args.runs:
        edit, asked, manifest = edits(run, args.data, args.cells, args.split)
        fine = edit - uniform_filter(edit, size=(1, 5, 5, 1), mode="nearest")
        energy = np.sqrt((fine ** 2).mean(axis=(1, 2)))  # [N, C]
        across = np.abs(np.diff(fine, axis=2)).mean(axis=(1, 2))
        down = np.abs(np.diff(fine, axis=1)).mean(axis=(1, 2))
        print(f"{run} ({len(edit)} {args.split} cells)")
        for c, name in enumerate(manifest["channels"]):
            q = np.quantile(energy[:, c], [0.5, 0.9, 0.99])
            top = energy[:, c] >= q[1]
            print(f"  {name:12s} fine-line energy median {q[0]:.4f}, 90% {q[1]:.4f}, "
                  f"99% {q[2]:.4f}; columns / rows {np.median(across[:, c] / down[:, c]):.2f} "
                  f"(top 10% of cells {np.median(across[top, c] / down[top, c]):.2f})")
        c = int(np.argmax(np.quantile(energy, 0.99, axis=0)))
        names = manifest["features"]["names"]
        varying = asked.std(axis=0) > 0
        r = np.zeros(len(names))
        a = (asked[:, varying] - asked[:, varying].mean(0)) / asked[:, varying].std(0)
        e = (energy[:, c] - energy[:, c].mean()) / energy[:, c].std()
        r[varying] = (a * e[:, None]).mean(0)
        print(f"  {manifest['channels'][c]}: the asked changes that go with its fine lines")
        for j in np.argsort(-np.abs(r))[:8]:
            print(f"    r {r[j]:+.2f}  {names[j]}")


if __name__ == "__main__":
    main()
