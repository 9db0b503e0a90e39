"""traverse: one feature varied around a base profile, the features correlated with it moving
with it (or it alone), or the way from one treatment's mean to another's, each step drawn.

    traverse(model, "out", ["Nuclei_AreaShape_Area"], data="demo-output/tfrecords")

Writes traverse.png (one row per feature or interpolation; at most MONTAGE_STEPS steps of each
shown), one TCYX stack per row (every step) and traverse.csv. Every step stays within the
training split's range of each feature (the manifest's min and max; a base already beyond them
stays where it is), unless extrapolate.

The correlated direction (`correlated_offsets`) is the one explore's sliders move along: each
feature's expected change, over the training cells, when the chosen ones change.
"""
from __future__ import annotations

import difflib
import math
import warnings

import numpy as np
import pandas as pd

from cp2image_tf.drawing.generate import file_label
from cp2image_tf.drawing.profiles import (cell_profile, training_range, treatment_means,
                                          warn_nonfinite)
from cp2image_tf.viz import save_tiles, write_hyperstack
from tfrecords_tools.atomic import OutputFolder
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import matching_manifest
from tfrecords_tools.reader import iter_cells

MAX_STEPS = 1000  # a TIFF stack of 1000 steps of a 68 px crop is ~55 MB; beyond, refused
MONTAGE_STEPS = 25  # steps of a row shown in traverse.png (evenly, both ends kept)
SHRINK = 0.1  # of the chosen features' correlations with each other, towards 0 (see below)


def resolve_feature(model, name: str) -> str:
    """A feature's full name from an exact, case-insensitive or unique partial name."""
    names = model.feature_names
    if name in names:
        return name
    lower = {n.lower(): n for n in names}
    if name.lower() in lower:
        return lower[name.lower()]
    partial = [n for n in names if n.lower().endswith("_" + name.lower())]
    if len(partial) == 1:
        return partial[0]
    if partial:
        raise UserInputError(f"--feature {name}: matches {', '.join(partial[:6])}; give the full "
                             "name.")
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserInputError(f"--feature {name}: not one of the model's {len(names)} features.{hint} "
                         "The list is in the SavedModel's assets/feature_names.txt or the "
                         "dataset's manifest.json.")


def base_profile(model, base: str, data=None) -> tuple[np.ndarray, str]:
    """The profile a traversal starts from: the training median, a treatment's mean, or a cell."""
    if base == "median":
        return model.median.copy(), "the training median cell"
    if base in model.description.get("treatments", []):
        return treatment_means(data, model, [base]).to_numpy(np.float32)[0], f"the {base} mean"
    return cell_profile(data, model, base), f"cell {base}"


def training_z(data, model, max_cells: int = 20000) -> np.ndarray:
    """float32 [N, F]: up to max_cells training cells of DATA_DIR, each feature standardised
    over them (missing values at the training median)."""
    manifest = matching_manifest(data, model.feature_names)
    rows = []
    for _, values in iter_cells(data, manifest, splits=("train",)):
        rows.append(values)
        if len(rows) >= max_cells:
            break
    if not rows:
        raise UserInputError(f"{data}: no training cells to take the features' correlations from.")
    values = np.stack(rows).astype(np.float64)
    values = np.where(np.isfinite(values), values, model.median)
    sd = values.std(0)
    return ((values - values.mean(0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def correlations_with(z: np.ndarray, columns) -> np.ndarray:
    """Correlation [len(columns), F] of each chosen feature with every feature, from training_z."""
    return (z[:, list(columns)].astype(np.float64).T @ z.astype(np.float64)) / len(z)


def feature_correlations_with(data, model, columns, max_cells: int = 20000) -> np.ndarray:
    """Correlation [len(columns), F] of each chosen feature with every feature, over up to
    max_cells training cells of DATA_DIR (missing values at the training median)."""
    if data is None:
        raise UserInputError("--correlated needs --data DATA_DIR: the correlations between "
                             "features come from the training cells (or give --alone).")
    return correlations_with(training_z(data, model, max_cells), columns)


def correlated_offsets(correlations, chosen, offsets) -> np.ndarray:
    """SD offsets [F] of every feature when the features `chosen` move by `offsets` SDs: each
    feature's expected change over the training cells (its least-squares regression on the
    chosen ones, in SDs), the chosen ones exactly as asked. `correlations`: their rows
    [len(chosen), F] (correlations_with). For one feature this is its correlation row times the
    offset: a cell with a larger nucleus has, on average, a larger perimeter and diameter too.
    The chosen features' correlations with each other are shrunk by SHRINK towards 0, so that
    two nearly identical features (area and filled area) asked to move differently do not push
    the others without bound."""
    rows = np.asarray(correlations, np.float64).reshape(len(chosen), -1)
    asked = np.asarray(offsets, np.float64)
    inner = (1 - SHRINK) * rows[:, chosen] + SHRINK * np.eye(len(chosen))
    weights = np.linalg.solve(inner, asked) if len(chosen) else asked
    move = weights @ rows
    move[list(chosen)] = asked
    return move


def within_range(profiles, bounds, origin=None) -> tuple[np.ndarray, np.ndarray]:
    """(profiles with each feature clamped to bounds = (low, high), which values were). The
    range widens to take in `origin` (a base beyond it stays where it is); a feature without
    finite bounds is left as it is."""
    profiles = np.asarray(profiles, np.float64)
    low, high = (np.where(np.isfinite(b), b, fill) for b, fill in zip(bounds, (-np.inf, np.inf)))
    if origin is not None:
        low, high = np.minimum(low, origin), np.maximum(high, origin)
    clamped = np.clip(profiles, low, high)
    return clamped, clamped != profiles


def range_label(value, was_clamped, low, high) -> str:
    """A step's value, saying where the training range stopped it."""
    if not was_clamped:
        return f"{value:.4g}"
    return f"{value:.4g} ({'min' if value <= low else 'max'})"


def traversal_profiles(origin, j: int, move, sd, zs) -> np.ndarray:
    """[len(zs), F] profiles: feature j at origin + z SDs; every other feature k at origin +
    z * move[k] SDs (move: the unit vector of j, or correlated_offsets(rows, [j], [1]))."""
    profiles = origin[None] + zs[:, None] * (move * sd)[None]
    profiles[:, j] = origin[j] + zs * sd[j]
    return profiles


def interpolation_profiles(a: str, a_raw, b: str, b_raw, steps: int):
    """(profiles [steps, F], labels): linear steps from profile a to profile b."""
    alphas = np.linspace(0.0, 1.0, steps)
    profiles = (1 - alphas[:, None]) * a_raw[None] + alphas[:, None] * b_raw[None]
    labels = [a if k == 0 else b if k == steps - 1 else f"{alpha:.2f}"
              for k, alpha in enumerate(alphas)]
    return profiles, labels


def traverse(model, out_dir, features=(), start: float = -2.0, stop: float = 2.0,
             steps: int = 7, base: str = "median", data=None, interpolate=None,
             correlated: bool | None = None, alone: bool = False, overwrite: bool = False,
             extrapolate: bool = False) -> dict:
    """Vary each feature from `start` to `stop` training SDs around a base profile, the others
    moving by their expected change (correlated_offsets: what cells with that value look like
    on average, e.g. area, perimeter and diameters together; needs `data`), or with `alone`
    held. Without `data` (and without `correlated=True`, which then fails), the feature moves
    alone, with a warning. Or (`interpolate=(A, B)`) move linearly from treatment A's mean to
    B's. Each value stays within the training range (labelled "min" or "max" where it
    stopped), unless `extrapolate`. Writes traverse.png (one row per feature, at most
    MONTAGE_STEPS steps shown), one TIFF stack per row (every step) and traverse.csv."""
    check_steps(start, stop, steps)
    if not features and not interpolate:
        raise UserInputError("Give --feature NAME (one or more) or --interpolate A B.")
    if correlated and alone:
        raise UserInputError("--correlated and --alone: give one (correlated is the default).")
    if features and not alone and not correlated and data is None:
        warnings.warn("moving each feature alone: the features correlated with it move with it "
                      "only with --data DATA_DIR (their correlations come from its training "
                      "cells); give --alone to say so.", UserWarning, stacklevel=2)
        alone = True
    rows = []  # (name, profiles [steps, F], tile labels, traverse.csv records)
    bounds = None if extrapolate else training_range(
        getattr(model, "manifest", None),
        matching_manifest(data, model.feature_names) if data is not None else None)
    if features:
        title = _feature_rows(rows, model, features, np.linspace(start, stop, steps), base, data,
                              not alone, bounds)
    if interpolate:
        rows.append(_interpolation_row(model, interpolate, steps, data, bounds))
        if not features:
            title = f"Interpolation between treatment means (model: {model.source})"
    title += ("; values beyond the training range drawn at its limits" if bounds is not None
              else "; values not limited to the training range" if extrapolate
              else "; no training range in the manifest (convert again): values not limited")
    profiles = np.concatenate([row[1] for row in rows]).astype(np.float32)
    if getattr(model, "can_pin", False):
        # The exemplar model: each row edits one training cell (the one nearest the row's
        # middle profile), so the row shows a cell changing, not the lookup jumping.
        like = np.concatenate([np.repeat(row[1][[steps // 2]], steps, 0) for row in rows])
        images = model.edits(profiles, like.astype(np.float32))
        title += "; each row edits one training cell"
    else:
        images = model.images(profiles)
    images = images.reshape(len(rows), steps, *model.crop_shape)
    with OutputFolder(out_dir, overwrite) as folder:
        stacks = _write_traversal(folder.path, model, rows, profiles, images, title)
    return {"out_dir": str(folder.out_dir), "montage": "traverse.png", "stacks": stacks,
            "images": images, "rows": [row[0] for row in rows]}


def check_steps(start: float, stop: float, steps: int) -> None:
    """A clear error for a --from/--to that is not a finite number or --steps out of range."""
    for option, value in (("--from", start), ("--to", stop)):
        if not math.isfinite(value):
            raise UserInputError(f"{option} {value}: give a finite number of training SDs from "
                                 "the base (e.g. --from -2 --to 2).")
    if steps < 2:
        raise UserInputError(f"--steps {steps}: at least 2.")
    if steps > MAX_STEPS:
        raise UserInputError(f"--steps {steps}: at most {MAX_STEPS} (each step is a frame of a "
                             "TIFF stack); draw a narrower --from/--to range in fewer steps.")


def _feature_rows(rows: list, model, features, zs, base: str, data, correlated: bool,
                  bounds) -> str:
    """One row per feature varied over `zs` SDs from the base profile; returns the title."""
    origin, base_name = base_profile(model, base, data)
    warn_nonfinite(origin[None], model.feature_names, f"base profile ({base_name})")
    origin = np.where(np.isfinite(origin), origin, model.median)
    chosen = [model.feature_names.index(resolve_feature(model, name)) for name in features]
    for j in chosen:
        if not model.sd[j] > 0:
            raise UserInputError(f"--feature {model.feature_names[j]}: its training SD is 0; "
                                 "it cannot be varied.")
    moves = np.zeros((len(chosen), len(origin)))
    moves[np.arange(len(chosen)), chosen] = 1.0
    if correlated:
        correlations = feature_correlations_with(data, model, chosen)
        moves = np.stack([correlated_offsets(row[None], [j], [1.0])
                          for j, row in zip(chosen, correlations)])
    for j, move in zip(chosen, moves):
        full = model.feature_names[j]
        profiles = traversal_profiles(origin, j, move, model.sd, zs)
        clamped = np.zeros(profiles.shape, bool)
        if bounds is not None:
            profiles, clamped = within_range(profiles, bounds, origin)
        low, high = (np.nan, np.nan) if bounds is None else (bounds[0][j], bounds[1][j])
        rows.append((full, profiles,
                     [f"{z:+.1f} SD\n{range_label(v, c, low, high)}"
                      for z, v, c in zip(zs, profiles[:, j], clamped[:, j])],
                     [{"row": full, "step": k, "z": z, "value": v, "clamped": bool(c)}
                      for k, (z, v, c) in enumerate(zip(zs, profiles[:, j], clamped[:, j]))]))
    others = ("correlated features moving with it" if correlated else "the feature alone")
    return f"Traversal from {base_name}, {others} (model: {model.source})"


def _interpolation_row(model, interpolate, steps: int, data, bounds) -> tuple:
    """The row from treatment A's mean profile to B's (within the training range: each step
    lies between two means, so only a mean beyond it would be limited)."""
    a, b = interpolate
    means = treatment_means(data, model, [a, b]).to_numpy(np.float32)
    means = np.where(np.isfinite(means), means, model.median)
    if bounds is not None:
        means = within_range(means, bounds)[0]
    profiles, labels = interpolation_profiles(a, means[0], b, means[1], steps)
    return (f"{a} -> {b}", profiles, labels,
            [{"row": f"{a} -> {b}", "step": k, "z": alpha, "value": np.nan, "clamped": False}
             for k, alpha in enumerate(np.linspace(0.0, 1.0, steps))])


def montage_steps(steps: int, most: int = MONTAGE_STEPS) -> np.ndarray:
    """Which steps traverse.png shows: all, or `most` evenly spaced ones with both ends."""
    if steps <= most:
        return np.arange(steps)
    return np.unique(np.round(np.linspace(0, steps - 1, most)).astype(int))


def _write_traversal(folder, model, rows, profiles, images, title) -> list[str]:
    """A TIFF stack per row, traverse.csv and traverse.png; returns the stacks' names."""
    stacks = []
    for (name, _, labels, _), row in zip(rows, images):
        stack = f"traverse_{file_label(name)}.tif"
        write_hyperstack(folder / stack, row, model.channels,
                         [label.replace("\n", " ") for label in labels])
        stacks.append(stack)
    table = pd.DataFrame([record for row in rows for record in row[3]])
    table = pd.concat([table, pd.DataFrame(profiles, columns=model.feature_names)], axis=1)
    table.to_csv(folder / "traverse.csv", index=False)
    names = [row[0] for row in rows]
    shown = montage_steps(images.shape[1])
    if len(shown) < images.shape[1]:
        title += (f"\n{len(shown)} of {images.shape[1]} steps shown; every step in the TIFF "
                  "stacks and traverse.csv")
    save_tiles(folder / "traverse.png", images[:, shown], model.channels,
               [[row[2][k] for k in shown] for row in rows],
               [n.replace("_", "_\n", 1) if len(n) > 22 else n for n in names], title)
    return stacks
