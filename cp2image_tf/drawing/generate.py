"""generate: one cell drawn per profile, from a CellProfiler table or treatments' means.

    model = load_model("demo-output/models/cp2image")                 # cp2image_tf.serving
    generate(model, "Nuclei_profiles.csv", "out")                     # one cell per row
    generate(model, None, "out", treatment_mean=["DMSO"], data="demo-output/tfrecords")

A model is a LocalModel (a run folder or SavedModel) or a RemoteModel (TensorFlow Serving);
both take raw CellProfiler values by feature name and return images in [0, 1].

Outputs (a folder, written under a temporary name and renamed when complete):
    cells/<n>_<label>.tif   one ImageJ hyperstack per cell (channels named and coloured)
    montage.png             the cells as colour composites, labelled
    profiles.csv            the raw values each cell was drawn from
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cp2image_tf.drawing.profiles import (read_profiles, row_labels, treatment_means,
                                          warn_far_beyond, warn_nonfinite)
from cp2image_tf.viz import save_tiles, write_hyperstack
from tfrecords_tools.atomic import OutputFolder
from tfrecords_tools.errors import UserInputError

MONTAGE_MAX = 64


def file_label(label: str) -> str:
    """A label as part of a file name: letters, digits and ._- only, at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "cell"


def _write_cells(folder: Path, images, labels, profiles: pd.DataFrame, channels, title,
                 legend=None) -> dict:
    cells = folder / "cells"
    cells.mkdir()
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i + 1:04d}_{file_label(label)}.tif"
        write_hyperstack(cells / name, image, channels)
        files.append(f"cells/{name}")
    table = profiles.copy()
    table.insert(0, "file", files)
    table.insert(0, "label", labels)
    table.to_csv(folder / "profiles.csv", index=False)
    shown = min(len(images), MONTAGE_MAX)
    cols = min(8, shown)
    rows = -(-shown // cols)
    h, w, c = images.shape[1:]
    tiles = np.full((rows * cols, h, w, c), np.nan, np.float32)
    tiles[:shown] = images[:shown]
    tile_labels = [labels[i] if i < shown else "" for i in range(rows * cols)]
    if len(images) > shown:
        title += f" (first {shown} of {len(images)}; all in cells/)"
    save_tiles(folder / "montage.png", tiles.reshape(rows, cols, h, w, c), channels,
               [tile_labels[r * cols:(r + 1) * cols] for r in range(rows)], title=title,
               channel_labels=legend)
    return {"cells": len(images), "montage": "montage.png", "tiffs": "cells/"}


def generate(model, profiles=None, out_dir=None, treatment_mean=None, data=None,
             object_name: str | None = None, missing: str = "error", label_column=None,
             limit: int | None = None, overwrite: bool = False) -> dict:
    """Draw one cell per profile: rows of a CellProfiler table (`profiles`) or treatments'
    mean profiles (`treatment_mean`, names or ["all"], with `data`). Returns a summary."""
    if (profiles is None) == (treatment_mean is None):
        raise UserInputError("Give PROFILES (a table of CellProfiler rows) or --treatment-mean "
                             "NAME --data DATA_DIR, not both.")
    if out_dir is None:
        raise UserInputError("OUT_DIR is needed.")
    if profiles is not None:
        values, extra = read_profiles(profiles, model.feature_names, object_name, missing)
        labels = row_labels(extra, label_column)
        what = str(profiles)
    else:
        values = treatment_means(data, model, treatment_mean)
        labels = [f"{t} mean" for t in values.index]
        what = f"treatment means of {data}"
    if limit is not None:
        values, labels = values.iloc[:limit], labels[:limit]
    raw = values.to_numpy(np.float32)
    warn_nonfinite(raw, model.feature_names, what)
    warn_far_beyond(raw, model, what)
    images = model.images(raw)
    with OutputFolder(out_dir, overwrite) as folder:
        title = f"{len(images)} cell(s) drawn from {what}\nmodel: {model.source}"
        summary = _write_cells(folder.path, images, labels, values.reset_index(drop=True),
                               model.channels, title, getattr(model, "channel_labels", None))
    return {**summary, "out_dir": str(folder.out_dir), "images": images, "labels": labels}


