"""A model on this machine, ready to draw: a run folder of `fit` or an exported SavedModel (or
its model base: the highest version), called through the same serving signatures TensorFlow
Serving runs, so local and served models draw the same cells."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cp2image_tf.serving.export import load_run, model_description, serving_module
from cp2image_tf.tflog import without_harmless_lines
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import channel_label

BATCH = 256


class LocalModel:
    """A decoder from a run folder or a SavedModel, called through the serving signatures."""

    def __init__(self, signatures: dict, description: dict, manifest: dict, source: str,
                 keep=None):
        self._images = signatures["serving_default"]
        self._pngs = signatures["generate_png"]
        self._edit = signatures.get("edit")  # the exemplar model's pinned-exemplar signature
        self._keep = keep  # the object that owns the functions' variables
        self.description = description
        self.manifest = manifest
        self.source = source
        self.feature_names = list(description["feature_names"])
        self.channels = list(description["channels"])
        # 'rawGFP (measured as CorrGreen)' where the features name another image (legends).
        self.channel_labels = [channel_label(manifest or {"channels": self.channels}, ch)
                               for ch in self.channels]
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

    @property
    def can_pin(self) -> bool:
        """Whether the model draws profiles as edits of a chosen training cell (exemplar model)."""
        return self._edit is not None

    def edits(self, raw, like) -> np.ndarray:
        """Raw values [N, F], each drawn as an edit of the training cell nearest `like` ([F] or
        [N, F]): images [N, H, W, C]. Models without an exemplar bank draw `raw` as images()."""
        import tensorflow as tf

        if self._edit is None:
            return self.images(raw)
        raw = check_matrix(raw, len(self.feature_names))
        like = np.broadcast_to(check_matrix(like, len(self.feature_names)), raw.shape)
        parts = [self._edit(features=tf.constant(raw[i:i + BATCH]),
                            like=tf.constant(np.ascontiguousarray(like[i:i + BATCH])))["images"].numpy()
                 for i in range(0, len(raw), BATCH)]
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


def load_model(path, checkpoint: str = "best", calibrated: bool = True):
    """A run folder, a SavedModel or a model base of numbered versions, ready to draw cells.
    `calibrated` (run folders): with the edit strength calibrated after fit (load_run)."""
    import tensorflow as tf

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: no such folder. MODEL is a run folder of `cp2image-tf fit` "
                             "or a SavedModel written by `cp2image-tf export`.")
    if (path / "config.json").is_file():
        decoder, manifest, config, info = load_run(path, checkpoint, calibrated)
        module = serving_module(decoder, manifest, config.normalization, config.noise_dim, info,
                                config.scaling)
        signatures = {"serving_default": module.serve, "generate_png": module.generate_png}
        if module.edit is not None:
            signatures["edit"] = module.edit
        description = model_description(manifest, config.normalization, config.scaling, info)
        return LocalModel(signatures, description, manifest,
                          f"run {path} ({checkpoint} checkpoint, step {info['step']})", module)
    saved = resolve_saved_model(path)
    if saved is None:
        raise UserInputError(f"{path}: neither a run folder (config.json) nor a SavedModel "
                             "(saved_model.pb, or numbered versions holding one).")
    with without_harmless_lines():  # the bank's float16 crops: TensorFlow's line (tflog)
        loaded = tf.saved_model.load(str(saved))
    missing = {"serving_default", "generate_png", "describe"} - set(loaded.signatures)
    if missing:
        raise UserInputError(f"{saved}: a SavedModel without the signature(s) "
                             f"{', '.join(sorted(missing))}; export it with `cp2image-tf export`.")
    describe = loaded.signatures["describe"]
    values = describe(key=tf.constant(["model", "manifest"]))["value"].numpy()
    description, manifest = (json.loads(v.decode()) for v in values)
    return LocalModel(loaded.signatures, description, manifest, f"SavedModel {saved}", loaded)
