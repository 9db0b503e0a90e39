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


def channel_legend(fig, channels, left: float, step: float, labels=None) -> None:
    """Channel names (or `labels`) in their colours along the bottom of a figure (fractions of
    its width)."""
    for k, (ch, colour) in enumerate(zip(labels or channels, channel_colours(channels))):
        fig.text(left + step * k, 0.005, ch, color=tuple(np.clip(colour, 0, 1)), fontsize=8,
                 fontweight="bold", va="bottom")


def save_grid(path, rows: dict, channels, row_labels=None, title: str = "", scale: int = 3) -> None:
    """A PNG grid: one column per entry of `rows` ({"real": [N,H,W,C], "generated": ...}),
    one row per cell, each shown as a composite, with a channel legend.

    Each column is one image (its cells stacked with a white gap) in one axes, the cells'
    labels as its ticks: a grid of many cells costs a few axes, not one per cell (matplotlib's
    axes are what made evaluate's pictures slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = len(next(iter(rows.values())))
    height, width = np.asarray(rows[names[0]]).shape[1:3]
    gap = 4 * scale
    fig, axes = plt.subplots(1, len(names), squeeze=False,
                             figsize=(1.3 * len(names) * width * scale / 100 + 1.2,
                                      1.2 * n * height * scale / 100 + 0.8), dpi=100)
    centres = [i * (height * scale + gap) + height * scale / 2 for i in range(n)]
    for j, name in enumerate(names):
        tiles = upscale(composite(rows[name], channels), scale)
        column = np.full((n * (height * scale + gap) - gap, width * scale, 3), 255, np.uint8)
        for i in range(n):
            top = i * (height * scale + gap)
            column[top:top + height * scale] = tiles[i]
        ax = axes[0, j]
        ax.imshow(column, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks(centres if j == 0 and row_labels is not None else [])
        if j == 0 and row_labels is not None:
            ax.set_yticklabels(row_labels, fontsize=7)
            ax.tick_params(axis="y", length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}\n" if title else "", fontsize=9)
    channel_legend(fig, channels, 0.02, 0.12)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def save_tiles(path, tiles, channels, tile_labels=None, row_labels=None, title: str = "",
               scale: int = 3, legend: bool = True, channel_labels=None) -> None:
    """A PNG of composites laid out as `tiles` [rows, cols, H, W, C] (NaN tiles left blank),
    each with an optional label under it, rows optionally labelled on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = np.asarray(tiles, dtype=np.float32)
    n_rows, n_cols, height, width = tiles.shape[:4]
    label_lines = max((str(t).count("\n") + 1 for row in (tile_labels or []) for t in row), default=0)
    tile_w = width * scale / 100
    tile_h = height * scale / 100 + 0.14 * label_lines
    left = 1.6 if row_labels is not None else 0.1
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, dpi=100,
                             figsize=(n_cols * (tile_w + 0.08) + left, n_rows * (tile_h + 0.08) + 0.9))
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if np.isnan(tiles[i, j]).all():
                ax.axis("off")
                continue
            ax.imshow(upscale(composite(tiles[i, j], channels), scale), interpolation="nearest")
            if tile_labels is not None and tile_labels[i][j]:
                ax.set_xlabel(tile_labels[i][j], fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    if legend:
        channel_legend(fig, channels, 0.01, 0.1 if channel_labels is None else 0.25,
                       channel_labels)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, facecolor="white")
    plt.close(fig)


def write_hyperstack(path, images, channels, frame_labels=None) -> None:
    """Float images in [0, 1] as an ImageJ hyperstack TIFF that Fiji and napari open with
    named, coloured channels: [H, W, C] -> CYX, or [T, H, W, C] -> TCYX with frame labels."""
    import tifffile

    images = np.asarray(images, dtype=np.float32)
    frames = images[None] if images.ndim == 3 else images
    data = np.ascontiguousarray(np.moveaxis(frames, -1, 1))  # T, C, Y, X
    luts = []
    for colour in channel_colours(channels):
        ramp = np.linspace(0, 1, 256)[None, :] * np.clip(colour, 0, 1)[:, None]
        luts.append(np.round(ramp * 255).astype(np.uint8))
    if frame_labels is None:
        labels = list(channels) * len(frames)
    else:
        labels = [f"{frame} {ch}" for frame in frame_labels for ch in channels]
    metadata = {"axes": "CYX" if images.ndim == 3 else "TCYX", "mode": "composite",
                "Labels": labels, "Ranges": (0.0, 1.0) * len(channels), "LUTs": luts}
    tifffile.imwrite(path, data[0] if images.ndim == 3 else data, imagej=True, metadata=metadata)
