"""Drawing cells from CellProfiler profiles: `generate`, `traverse` and `predict`.

A model is a run folder of `fit`, an exported SavedModel (or its model base, the
highest version is used), or a TensorFlow Serving endpoint (`RemoteModel`); all
take raw CellProfiler values by feature name and return images in [0, 1].

    model = load_model("demo-output/models/cp2image")
    generate(model, "Nuclei_profiles.csv", "out")                     # one cell per row
    generate(model, None, "out", treatment_mean=["DMSO"], data="demo-output/tfrecords")
    traverse(model, "out", ["Nuclei_AreaShape_Area"], data="demo-output/tfrecords")

Outputs (a folder, written under a temporary name and renamed when complete):
    cells/<n>_<label>.tif   one ImageJ hyperstack per cell (channels named and coloured)
    montage.png             the cells as colour composites, labelled
    profiles.csv            the raw values each cell was drawn from
Traversals write traverse.png, one TCYX stack per feature (or interpolation) and
traverse.csv.
"""
from __future__ import annotations

import difflib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

BATCH = 256
MONTAGE_MAX = 64
LABEL_COLUMNS = ("Metadata_Treatment", "Metadata_pert_iname", "Metadata_Compound",
                 "Metadata_Condition")


class LocalModel:
    """A decoder from a run folder or a SavedModel, called through the serving signatures."""

    def __init__(self, signatures: dict, description: dict, manifest: dict, source: str,
                 keep=None):
        self._images = signatures["serving_default"]
        self._pngs = signatures["generate_png"]
        self._keep = keep  # the object that owns the functions' variables
        self.description = description
        self.manifest = manifest
        self.source = source
        self.feature_names = list(description["feature_names"])
        self.channels = list(description["channels"])
        self.crop_shape = tuple(description["crop"])
        self.median = np.asarray(description["median"], dtype=np.float32)
        self.sd = np.asarray(description["sd"], dtype=np.float32)

    def _batched(self, fn, key, raw):
        import tensorflow as tf

        raw = check_matrix(raw, len(self.feature_names))
        return [fn(features=tf.constant(raw[i:i + BATCH]))[key].numpy()
                for i in range(0, len(raw), BATCH)]

    def images(self, raw) -> np.ndarray:
        """Raw CellProfiler values [N, F] -> images float32 [N, H, W, C] in [0, 1]."""
        parts = self._batched(self._images, "images", raw)
        return np.concatenate(parts) if parts else np.zeros((0, *self.crop_shape), np.float32)

    def pngs(self, raw) -> list[bytes]:
        """Raw CellProfiler values [N, F] -> one composite PNG per cell."""
        return [bytes(p) for part in self._batched(self._pngs, "png_bytes", raw) for p in part]


def check_matrix(raw, n_features: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim == 1:
        raw = raw[None]
    if raw.ndim != 2 or raw.shape[1] != n_features:
        raise UserInputError(f"features of shape {list(raw.shape)}: the model takes "
                             f"[cells, {n_features}] raw CellProfiler values.")
    return raw


def resolve_saved_model(path: Path) -> Path | None:
    """path itself if it is a SavedModel, its highest numbered version if it is a model base."""
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted((int(p.name), p) for p in path.iterdir()
                      if p.name.isdigit() and (p / "saved_model.pb").is_file())
    return versions[-1][1] if versions else None


def load_model(path, checkpoint: str = "best"):
    """A run folder, a SavedModel or a model base of numbered versions, ready to draw cells."""
    import tensorflow as tf

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: no such folder. MODEL is a run folder of `cp2image-tf fit` "
                             "or a SavedModel written by `cp2image-tf export`.")
    if (path / "config.json").is_file():
        from cp2image_tf.serving.export import load_run, model_description, serving_module

        decoder, manifest, config, info = load_run(path, checkpoint)
        module = serving_module(decoder, manifest, config.normalization, config.noise_dim, info,
                                config.scaling)
        signatures = {"serving_default": module.serve, "generate_png": module.generate_png}
        description = model_description(manifest, config.normalization, config.scaling, info)
        return LocalModel(signatures, description, manifest,
                          f"run {path} ({checkpoint} checkpoint, step {info['step']})", module)
    saved = resolve_saved_model(path)
    if saved is None:
        raise UserInputError(f"{path}: neither a run folder (config.json) nor a SavedModel "
                             "(saved_model.pb, or numbered versions holding one).")
    loaded = tf.saved_model.load(str(saved))
    missing = {"serving_default", "generate_png", "describe"} - set(loaded.signatures)
    if missing:
        raise UserInputError(f"{saved}: a SavedModel without the signature(s) "
                             f"{', '.join(sorted(missing))}; export it with `cp2image-tf export`.")
    describe = loaded.signatures["describe"]
    values = describe(key=tf.constant(["model", "manifest"]))["value"].numpy()
    description, manifest = (json.loads(v.decode()) for v in values)
    return LocalModel(loaded.signatures, description, manifest, f"SavedModel {saved}", loaded)


# --- profiles -----------------------------------------------------------------------------


def object_prefixes(feature_names) -> list[str]:
    return sorted({name.split("_", 1)[0] for name in feature_names})


def read_profiles(path, feature_names, object_name: str | None = None,
                  missing: str = "error") -> tuple[pd.DataFrame, pd.DataFrame]:
    """A CSV/Parquet of CellProfiler rows, or an ExportToSpreadsheet folder (its object tables
    joined per cell) -> (raw values [N, F] by feature name, the other columns).

    Columns are matched by name; extra columns are kept aside. A table of one object set
    (CellProfiler's Nuclei.csv: `AreaShape_Area`) is matched with its object's prefix
    (`Nuclei_AreaShape_Area`), taken from `object_name` or the file name. Features the table
    lacks are an error that lists them, or with missing="median" the training medians.
    """
    from tfrecords_tools.cellprofiler import read_table

    path = Path(path)
    if path.is_dir():
        table = read_cellprofiler_folder(path, feature_names)
    elif path.is_file():
        table = read_table(path)
    else:
        raise UserInputError(f"{path}: no such file or folder (PROFILES is a CSV or Parquet table "
                             "of CellProfiler measurements, one row per cell, or a CellProfiler "
                             "ExportToSpreadsheet folder).")
    if table.empty:
        raise UserInputError(f"{path}: the table has no rows.")
    prefixes = object_prefixes(feature_names)
    stem = re.sub(r"^MyExpt_", "", path.stem)
    object_name = object_name or (stem if stem in prefixes else None)
    if object_name is not None and object_name not in prefixes:
        raise UserInputError(f"--object {object_name}: the model's features come from "
                             f"{', '.join(prefixes)}.")
    columns = {}
    for name in feature_names:
        if name in table.columns:
            columns[name] = name
        elif object_name and name.startswith(f"{object_name}_") \
                and name[len(object_name) + 1:] in table.columns:
            columns[name] = name[len(object_name) + 1:]
    absent = [name for name in feature_names if name not in columns]
    if absent and missing != "median":
        shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
        from_objects = sorted({a.split("_", 1)[0] for a in absent})
        raise UserInputError(
            f"{path}: {len(absent)} of the model's {len(feature_names)} features are not columns "
            f"of the table: {shown} (objects {', '.join(from_objects)}). Give a table with one "
            "row per cell and <Object>_<Feature> columns for every object set (as pycytominer "
            "writes), or --missing median to draw them at the training medians.")
    values = pd.DataFrame(index=table.index, columns=feature_names, dtype=np.float32)
    for name, column in columns.items():
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & table[column].notna()
        if bad.any():
            raise UserInputError(f"{path}: column {column} holds non-numeric values "
                                 f"(e.g. {table[column][bad].iloc[0]!r} in row {bad.idxmax() + 2}).")
        values[name] = numbers.astype(np.float32)
    if absent:
        warnings.warn(f"{path}: {len(absent)} feature(s) not in the table are drawn at the "
                      f"training medians: {', '.join(absent[:5])}"
                      f"{' ...' if len(absent) > 5 else ''}", UserWarning, stacklevel=2)
    extra = table[[c for c in table.columns if c not in set(columns.values())]]
    return values.reset_index(drop=True), extra.reset_index(drop=True)


def read_cellprofiler_folder(folder: Path, feature_names) -> pd.DataFrame:
    """An ExportToSpreadsheet folder's object tables joined into one row per cell, columns
    <Object>_<Feature> for the model's object sets (the first one's rows are the cells), with
    the Image table's Metadata columns, as convert joins them."""
    from tfrecords_tools.convert import ConvertConfig, load_cellprofiler_cells

    objects = list(dict.fromkeys(name.split("_", 1)[0] for name in feature_names))
    cells, _, _ = load_cellprofiler_cells(ConvertConfig(input=str(folder), out_dir="",
                                                        channels=[], objects=objects))
    return cells.drop(columns=[c for c in cells.columns if c.startswith("_")])


def row_labels(extra: pd.DataFrame, label_column: str | None = None) -> list[str]:
    """A readable label per profile: --label-column, else treatment and image-object numbers."""
    if label_column is not None:
        if label_column not in extra.columns:
            raise UserInputError(f"--label-column {label_column}: not a column of PROFILES "
                                 f"(columns: {', '.join(map(str, extra.columns[:10]))}...).")
        return [str(v) for v in extra[label_column]]
    parts = []
    treatment = next((c for c in LABEL_COLUMNS if c in extra.columns), None)
    if treatment:
        parts.append(extra[treatment].astype(str))
    if {"ImageNumber", "ObjectNumber"} <= set(extra.columns):
        parts.append(extra["ImageNumber"].astype(str) + "-" + extra["ObjectNumber"].astype(str))
    if not parts:
        return [f"row {i + 1}" for i in range(len(extra))]
    labels = parts[0]
    for part in parts[1:]:
        labels = labels + " " + part
    return list(labels)


def warn_nonfinite(values: np.ndarray, feature_names, what: str) -> None:
    """Warn, naming the features, about NaN/inf values (the model imputes training medians)."""
    bad = ~np.isfinite(values)
    if bad.any():
        counts = bad.sum(0)
        named = [f"{feature_names[j]} ({counts[j]})" for j in np.argsort(-counts)[:5] if counts[j]]
        n_feat = int((counts > 0).sum())
        warnings.warn(f"{what}: {int(bad.sum())} missing or infinite value(s) in {n_feat} "
                      f"feature(s), drawn at the training medians: {', '.join(named)}"
                      f"{' ...' if n_feat > 5 else ''}", UserWarning, stacklevel=3)


def check_data(data, model):
    """The manifest of DATA_DIR, which must hold the model's features in the model's order."""
    from tfrecords_tools.manifest import load_manifest

    if data is None:
        return None
    manifest = load_manifest(data)
    if manifest["features"]["names"] != model.feature_names:
        raise UserInputError(
            f"{data}: its {manifest['features']['count']} features are not the model's "
            f"{len(model.feature_names)} (in order): use the dataset the model was trained on.")
    return manifest


def _records(data, manifest, treatment=None, splits=("train", "val", "test")):
    """(cell_id, raw features) of every cell of DATA_DIR's splits (or of one treatment)."""
    import tensorflow as tf

    from tfrecords_tools.manifest import shard_files
    from tfrecords_tools.records import iterate_records

    for split in splits:
        for shard in shard_files(manifest, data, split, treatment):
            for record in iterate_records(shard, manifest.get("compression", "")):
                fields = tf.train.Example.FromString(record).features.feature
                yield (fields["cell_id"].bytes_list.value[0].decode(),
                       np.frombuffer(fields["features"].bytes_list.value[0], dtype="<f4"))


def treatment_means(data, model, treatments, max_cells: int = 20000) -> pd.DataFrame:
    """Each treatment's mean raw profile (NaN ignored) over up to max_cells cells of DATA_DIR."""
    manifest = check_data(data, model)
    if manifest is None:
        raise UserInputError("--data DATA_DIR is needed for treatment means.")
    known = manifest["treatments"]["names"]
    if list(treatments) == ["all"]:
        treatments = known
    unknown = [t for t in treatments if t not in known]
    if unknown:
        raise UserInputError(f"treatment(s) {', '.join(unknown)} not in {data}; it has "
                             f"{', '.join(known)}.")
    rows = {}
    for treatment in treatments:
        feats = []
        for _, values in _records(data, manifest, treatment):
            feats.append(values)
            if len(feats) >= max_cells:
                break
        if not feats:
            raise UserInputError(f"{data}: no cells of treatment {treatment}.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            rows[treatment] = np.nanmean(np.stack(feats), axis=0)
    return pd.DataFrame.from_dict(rows, orient="index", columns=model.feature_names)


def cell_profile(data, model, cell_id: str) -> np.ndarray:
    """The raw profile of one cell of DATA_DIR by its id (<ImageNumber>-<ObjectNumber>)."""
    manifest = check_data(data, model)
    if manifest is None:
        raise UserInputError(f"--data DATA_DIR is needed to find cell {cell_id}.")
    for found, values in _records(data, manifest):
        if found == cell_id:
            return values.copy()
    raise UserInputError(f"cell {cell_id}: not in {data} (cell ids are <ImageNumber>-<ObjectNumber>, "
                         "as `cp2image-tf inspect DATA_DIR` shows).")


# --- outputs -------------------------------------------------------------------------------


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "cell"


class OutputFolder:
    """Writes into a temporary sibling folder; `commit` renames it to OUT_DIR."""

    def __init__(self, out_dir, overwrite: bool):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(f"{self.out_dir}: exists and is not a folder.")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise UserInputError(f"{self.out_dir}: exists and is not empty; use --overwrite to "
                                 "replace it or give a new OUT_DIR.")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-",
                                          dir=self.out_dir.parent))

    def commit(self) -> Path:
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.path.rename(self.out_dir)
        return self.out_dir

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_cells(folder: Path, images, labels, profiles: pd.DataFrame, channels, title) -> dict:
    from cp2image_tf.viz import save_tiles, write_hyperstack

    cells = folder / "cells"
    cells.mkdir()
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i + 1:04d}_{_safe(label)}.tif"
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
               [tile_labels[r * cols:(r + 1) * cols] for r in range(rows)], title=title)
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
    images = model.images(raw)
    folder = OutputFolder(out_dir, overwrite)
    try:
        title = f"{len(images)} cell(s) drawn from {what}\nmodel: {model.source}"
        summary = _write_cells(folder.path, images, labels, values.reset_index(drop=True),
                               model.channels, title)
        path = folder.commit()
    except BaseException:
        folder.abandon()
        raise
    return {**summary, "out_dir": str(path), "images": images, "labels": labels}


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


def feature_correlations_with(data, model, columns, max_cells: int = 20000) -> np.ndarray:
    """Correlation [len(columns), F] of each chosen feature with every feature, over up to
    max_cells training cells of DATA_DIR (missing values at the training median)."""
    manifest = check_data(data, model)
    if manifest is None:
        raise UserInputError("--correlated needs --data DATA_DIR: the correlations between "
                             "features come from the training cells.")
    rows = []
    for _, values in _records(data, manifest, splits=("train",)):
        rows.append(values)
        if len(rows) >= max_cells:
            break
    values = np.stack(rows).astype(np.float64)
    values = np.where(np.isfinite(values), values, model.median)
    z = (values - values.mean(0)) / np.where(values.std(0) > 0, values.std(0), 1.0)
    return (z[:, columns].T @ z) / len(z)


def traversal_profiles(origin, j: int, move, sd, zs) -> np.ndarray:
    """[len(zs), F] profiles: feature j at origin + z SDs; every other feature k at origin +
    z * move[k] SDs (move: the unit vector of j, or its training correlations)."""
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
             correlated: bool = False, overwrite: bool = False) -> dict:
    """Vary each feature from `start` to `stop` training SDs around a base profile, holding
    the others; with `correlated`, the others move by their expected change (each by its
    training correlation with the varied feature, in SDs: what cells with that value look
    like on average, e.g. area, perimeter and diameters together). Or (`interpolate=(A, B)`)
    move linearly from treatment A's mean to B's. Writes traverse.png (one row per feature),
    one TIFF stack per row and traverse.csv."""
    if steps < 2:
        raise UserInputError(f"--steps {steps}: at least 2.")
    if not features and not interpolate:
        raise UserInputError("Give --feature NAME (one or more) or --interpolate A B.")
    rows, row_names, tile_labels, records = [], [], [], []
    if features:
        origin, base_name = base_profile(model, base, data)
        warn_nonfinite(origin[None], model.feature_names, f"base profile ({base_name})")
        origin = np.where(np.isfinite(origin), origin, model.median)
        zs = np.linspace(start, stop, steps)
        chosen = [model.feature_names.index(resolve_feature(model, name)) for name in features]
        for j in chosen:
            if not model.sd[j] > 0:
                raise UserInputError(f"--feature {model.feature_names[j]}: its training SD is 0; "
                                     "it cannot be varied.")
        moves = np.zeros((len(chosen), len(origin)))
        moves[np.arange(len(chosen)), chosen] = 1.0
        if correlated:
            moves = feature_correlations_with(data, model, chosen)
        for j, move in zip(chosen, moves):
            full = model.feature_names[j]
            profiles = traversal_profiles(origin, j, move, model.sd, zs)
            rows.append(profiles)
            row_names.append(full)
            tile_labels.append([f"{z:+.1f} SD\n{v:.4g}" for z, v in zip(zs, profiles[:, j])])
            records += [{"row": full, "step": k, "z": z, "value": v}
                        for k, (z, v) in enumerate(zip(zs, profiles[:, j]))]
        others = ("correlated features moved with it" if correlated else "other features held")
        title = f"Traversal from {base_name}, {others} (model: {model.source})"
    if interpolate:
        a, b = interpolate
        means = treatment_means(data, model, [a, b]).to_numpy(np.float32)
        means = np.where(np.isfinite(means), means, model.median)
        profiles, labels = interpolation_profiles(a, means[0], b, means[1], steps)
        rows.append(profiles)
        row_names.append(f"{a} -> {b}")
        tile_labels.append(labels)
        records += [{"row": f"{a} -> {b}", "step": k, "z": alpha, "value": np.nan}
                    for k, alpha in enumerate(np.linspace(0.0, 1.0, steps))]
        if not features:
            title = f"Interpolation between treatment means (model: {model.source})"
    profiles = np.concatenate(rows).astype(np.float32)
    images = model.images(profiles).reshape(len(rows), steps, *model.crop_shape)
    folder = OutputFolder(out_dir, overwrite)
    try:
        from cp2image_tf.viz import save_tiles, write_hyperstack

        stacks = []
        for name, row, labels in zip(row_names, images, tile_labels):
            stack = f"traverse_{_safe(name)}.tif"
            write_hyperstack(folder.path / stack, row, model.channels,
                             [label.replace("\n", " ") for label in labels])
            stacks.append(stack)
        table = pd.DataFrame(records)
        table = pd.concat([table, pd.DataFrame(profiles, columns=model.feature_names)], axis=1)
        table.to_csv(folder.path / "traverse.csv", index=False)
        save_tiles(folder.path / "traverse.png", images, model.channels, tile_labels,
                   [n.replace("_", "_\n", 1) if len(n) > 22 else n for n in row_names], title)
        path = folder.commit()
    except BaseException:
        folder.abandon()
        raise
    return {"out_dir": str(path), "montage": "traverse.png", "stacks": stacks, "images": images,
            "rows": row_names}
