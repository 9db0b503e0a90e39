"""evaluate's pictures: cells.png, overview.png, treatments/<treatment>.png, modules.png and
scatter.png.
matplotlib is imported when a chart is drawn (with the Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cp2image_tf.drawing.generate import file_label
from cp2image_tf.evaluation.compare import METHODS, THRESHOLD
from cp2image_tf.evaluation.report import fmt
from cp2image_tf.metrics import module_of
from cp2image_tf.viz import save_grid, save_tiles

PER_TREATMENT_CELLS = 6


def draw_pictures(folder: Path, cells, predictions, neighbour, reference, correlations, inputs,
              remeasured, channels, modules: dict, unseen: set) -> None:
    treatments = np.asarray(cells["treatments"])
    picks = [i for t in sorted(set(treatments)) for i in np.flatnonzero(treatments == t)[:2]]
    rows = {"real": cells["crops"][picks], "generated": predictions["model"][picks],
            "nearest neighbour": predictions["nearest neighbour"][picks],
            "mean image": np.broadcast_to(predictions["mean image"],
                                          cells["crops"][picks].shape)}
    labels = [f"{treatments[i]}\n{cells['cell_ids'][i]}\nNN {reference['cell_ids'][neighbour[i]]}"
              for i in picks]
    save_grid(folder / "cells.png", rows, channels, labels,
              title="Real cells, the model's drawing of their profiles, the nearest training "
                    "cell by profile, and the mean training image")
    overview_chart(folder / "overview.png", cells, predictions, channels)
    # One picture per treatment: real, generated and nearest-neighbour cells side by side.
    (folder / "treatments").mkdir()
    for t in sorted(set(treatments)):
        picks = np.flatnonzero(treatments == t)[:PER_TREATMENT_CELLS]
        rows = {"real": cells["crops"][picks], "generated": predictions["model"][picks],
                "nearest neighbour": predictions["nearest neighbour"][picks]}
        labels = [f"{cells['cell_ids'][i]}\nNN {reference['cell_ids'][neighbour[i]]}"
                  f"\n({reference['treatments'][neighbour[i]]})" for i in picks]
        save_grid(folder / "treatments" / f"{file_label(t)}.png", rows, channels, labels,
                  title=f"{t}{' (unseen in training)' if t in unseen else ''}: real cells, the "
                        "model's drawing of their profiles, the nearest training cell")
    module_chart(folder / "modules.png", modules)
    scatter_chart(folder / "scatter.png", correlations, inputs, remeasured)


def overview_chart(path, cells, predictions, channels, treatments: int = 7) -> None:
    """What the tool does, at a glance (the README's picture): the first evaluated cell of up to
    `treatments` treatments, real, drawn by the model from its features, and the nearest
    training cell by features."""
    names = np.asarray(cells["treatments"])
    picks = [int(np.flatnonzero(names == t)[0]) for t in sorted(set(names))[:treatments]]
    tiles = np.stack([cells["crops"][picks], predictions["model"][picks],
                      predictions["nearest neighbour"][picks]])
    save_tiles(path, tiles, channels, [[""] * len(picks)] * 2 + [[names[i] for i in picks]],
               ["real cell", "generated from\nits features", "nearest training\ncell by features"],
               title="Test cells never seen in training: the real crop, the model's drawing of "
                     "its CellProfiler features, the nearest training cell", scale=2)


def module_chart(path, table: dict) -> None:
    """Bars per module and method from the report's module table (`_module_report`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(table)
    colours = {"model": "#d62728", "nearest neighbour": "#1f77b4", "mean image": "#7f7f7f",
               "ceiling": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(modules) + 2), 4.2), dpi=100)
    width = 0.8 / len(METHODS)
    x = np.arange(len(modules))
    for ax, key, label in ((axes[0], "median_r", "median Pearson r"),
                           (axes[1], "fraction", f"share of features with r >= {THRESHOLD}")):
        for k, method in enumerate(METHODS):
            values = np.nan_to_num([table[m][method][key] for m in modules])
            ax.bar(x + (k - (len(METHODS) - 1) / 2) * width, values, width, label=method,
                   color=colours[method])
        ax.set_xticks(x)
        ax.set_xticklabels([f"{m.replace('Distribution', chr(10) + 'Distribution')}\n"
                            f"({table[m]['n_features']})" for m in modules], fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Input CellProfiler features vs the same features re-measured on each picture",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def scatter_chart(path, correlations, inputs, remeasured, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = correlations["ceiling"]["pearson"].dropna().sort_values(ascending=False)
    chosen, modules = [], set()
    for feature in ceiling.index:  # the best-reproduced feature of each module first
        if module_of(feature) not in modules:
            chosen.append(feature)
            modules.add(module_of(feature))
    chosen += [f for f in ceiling.index if f not in chosen]
    chosen = chosen[:n]
    if not chosen:
        return
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), dpi=100, squeeze=False)
    for ax, feature in zip(axes.ravel(), chosen):
        x = inputs[feature].to_numpy()
        for method, colour in (("ceiling", "#2ca02c"), ("model", "#d62728")):
            y = remeasured[method][feature].to_numpy()
            r = correlations[method].loc[feature, "pearson"]
            ax.scatter(x, y, s=5, alpha=0.5, color=colour,
                       label=f"{'real' if method == 'ceiling' else 'generated'} r={fmt(r, 2)}")
        ax.set_title(feature if len(feature) < 36 else "_\n".join(feature.split("_", 2)[:2])
                     + "_" + feature.split("_", 2)[2], fontsize=7)
        ax.set_xlabel("input (CellProfiler)", fontsize=7)
        ax.set_ylabel("re-measured", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)


STRIP_ROWS = {"correlated": "correlated\nfeatures move too", "alone": "this feature\nalone",
              "lookup": "lookup: nearest\ntraining cell"}


def control_strips(folder: Path, strips: dict, section: dict, channels) -> None:
    """controllability/<feature>.png: the first traversed cell drawn at each step, correlated,
    alone and by the lookup, with the asked and the re-measured value under each picture."""
    if not strips:
        return
    folder.mkdir()
    zs = np.linspace(-section["span"], section["span"], section["steps"])
    for entry in section["features"]:
        strip = strips[entry["feature"]]
        labels = [[f"{z:+.2g} SD\nasked {_value(a)}\nmeasured {_value(m)}"
                   for z, a, m in zip(zs, asked, measured)]
                  for asked, measured in zip(strip["asked"], strip["measured"])]
        rows = [f"{STRIP_ROWS[way]}\ngain {fmt(entry[way]['gain'], 2)}" for way in STRIP_ROWS]
        save_tiles(folder / f"{file_label(entry['feature'])}.png", strip["images"], channels,
                   labels, rows, title=f"{entry['feature']} (cell {section['cell_ids'][0]}): "
                                       "asked and re-measured", scale=2)


def _value(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"
