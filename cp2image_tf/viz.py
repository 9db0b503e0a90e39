"""Pictures of cells: channel composites as microscopists show them, and labelled grids."""
from __future__ import annotations

import numpy as np

# Colours by stain, as Cell Painting and BBBC021 figures show them.
STAIN_COLOURS = (
    (("dna", "dapi", "hoechst", "nuc"), (0.2, 0.4, 1.0)),
    (("tubulin", "er", "concanavalin"), (0.0, 1.0, 0.0)),
    (("actin", "agp", "phalloidin"), (1.0, 0.0, 0.0)),
    (("mito", "mitotracker"), (1.0, 0.0, 1.0)),
    (("rna", "syto"), (1.0, 1.0, 0.0)),
)
FALLBACK = ((0.0, 1.0, 1.0), (1.0, 0.5, 0.0), (0.6, 0.6, 0.6))


def channel_colours(channels) -> np.ndarray:
    """An RGB colour per channel name (DNA blue, tubulin green, actin red, ...)."""
    colours, spare = [], list(FALLBACK)
    for name in channels:
        lower = name.lower()
        match = next((c for keys, c in STAIN_COLOURS if any(k in lower for k in keys)), None)
        colours.append(match or (spare.pop(0) if spare else (1.0, 1.0, 1.0)))
    return np.asarray(colours, dtype=np.float32)


def composite(images, channels) -> np.ndarray:
    """[..., H, W, C] floats in [0, 1] -> [..., H, W, 3] uint8 additive colour composite."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    rgb = images @ channel_colours(channels)
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def upscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so that single pixels stay visible."""
    return np.repeat(np.repeat(rgb, factor, axis=-3), factor, axis=-2)


def save_grid(path, rows: dict, channels, row_labels=None, title: str = "", scale: int = 3) -> None:
    """A PNG grid: one column per entry of `rows` ({"real": [N,H,W,C], "generated": ...}),
    one row per cell, each shown as a composite, with a channel legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = len(next(iter(rows.values())))
    height, width = np.asarray(rows[names[0]]).shape[1:3]
    fig, axes = plt.subplots(n, len(names), squeeze=False,
                             figsize=(1.3 * len(names) * width * scale / 100 + 1.2,
                                      1.2 * n * height * scale / 100 + 0.8), dpi=100)
    for j, name in enumerate(names):
        tiles = upscale(composite(rows[name], channels), scale)
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(tiles[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    colours = channel_colours(channels)
    fig.suptitle(f"{title}\n" if title else "", fontsize=9)
    for k, ch in enumerate(channels):
        fig.text(0.02 + 0.12 * k, 0.005, ch, color=tuple(np.clip(colours[k], 0, 1)), fontsize=8,
                 fontweight="bold", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, facecolor="white")
    plt.close(fig)
