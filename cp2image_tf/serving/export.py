"""export: a trained decoder as a SavedModel that TensorFlow Serving serves as it is.

    MODEL_BASE/<version>/saved_model.pb, variables/       TensorFlow Serving's layout
    MODEL_BASE/<version>/assets/manifest.json             the training data's manifest
    MODEL_BASE/<version>/assets/feature_names.txt         one input feature per line, in order
    MODEL_BASE/<version>/assets/export.json               run, checkpoint step, normalisation
    MODEL_BASE/<version>/assets.extra/tf_serving_warmup_requests

Signatures (all take any batch size):
    serving_default  features float32 [B, F] raw CellProfiler values in feature_names.txt
                     order -> images float32 [B, H, W, C] in [0, 1]. NaN and inf are
                     replaced by the training medians and the features normalised with the
                     training statistics inside the graph.
    generate_png     features -> png_bytes string [B]: one composite PNG per cell (DNA
                     blue, tubulin green, actin red, ...). The `_bytes` suffix makes
                     TensorFlow Serving's REST API return them base64-encoded ({"b64": ...}).
    describe         key string [B] -> value string [B]: "model" gives a JSON object with
                     feature_names, channels, crop, medians and SDs; "manifest" the
                     manifest. Clients of a server read the feature names here.

A version is written under a hidden temporary name (which TensorFlow Serving
ignores) and renamed when complete; an existing version is never replaced.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tfrecords_tools._version import __version__
from tfrecords_tools.atomic import partial_folder, remove_stale_partials
from tfrecords_tools.errors import UserInputError

WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_BATCHES = (1, 8, 64)
DESCRIBE_KEYS = ("model", "manifest")
# The exemplar model's edit strength per checkpoint, written by evaluation/calibration.py.
CALIBRATION = "calibration.json"


def load_run(run_dir, checkpoint: str = "best", calibrated: bool = True):
    """(decoder with restored weights, manifest, FitConfig, checkpoint info) of a run folder.
    `calibrated`: the info carries the exemplar model's edit strength calibrated after fit for
    this checkpoint (evaluation/calibration.py), which its `edit` signature applies."""
    import tensorflow as tf

    from cp2image_tf.training.networks import build_model_decoder

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserInputError(f"{run_dir}: does not exist. Give the RUN_DIR of `cp2image-tf fit`.")
    if not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: is a file, not a run folder. Give the RUN_DIR of "
                             "`cp2image-tf fit`.")
    if not (run_dir / "config.json").is_file() or not (run_dir / "manifest.json").is_file():
        raise UserInputError(f"{run_dir}: not a run folder of `cp2image-tf fit` "
                             "(no config.json and manifest.json).")
    if checkpoint not in ("best", "latest"):
        raise UserInputError(f"--checkpoint {checkpoint}: choose best or latest.")
    from cp2image_tf.training.run_folder import saved_config

    config = saved_config(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    folder = run_dir / ("best" if checkpoint == "best" else "checkpoints")
    path = tf.train.latest_checkpoint(str(folder))
    if path is None:
        hint = (" Use --checkpoint latest, or let fit reach a validation step."
                if checkpoint == "best" else " Train it with `cp2image-tf fit` first.")
        raise UserInputError(f"{run_dir}: no {checkpoint} checkpoint in {folder}.{hint}")
    from cp2image_tf.training.checkpoints import restore_matching, unreadable

    problem = unreadable(path)
    if problem:
        other = "latest" if checkpoint == "best" else "best"
        raise UserInputError(f"{path}: this {checkpoint} checkpoint does not read ({problem}); "
                             f"it is truncated or damaged. Try --checkpoint {other}, or resume "
                             f"`cp2image-tf fit` to write a new one.")
    decoder = build_model_decoder(manifest, config)
    restore_matching(tf.train.Checkpoint(decoder=decoder), path, partial=True)
    step = int(path.rsplit("-", 1)[1])
    info = {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint, "step": step}
    if calibrated and config.model == "exemplar":
        strength = saved_strength(run_dir, step)
        if strength is not None:
            info["edit_strength"] = strength
    best = run_dir / "best" / "best.json"
    if checkpoint == "best" and best.is_file():
        info["validation"] = json.loads(best.read_text())
    return decoder, manifest, config, info


def saved_strength(run_dir, step: int):
    """The edit strength calibrated for the checkpoint at `step` of a run folder (a number, or
    one per feature), or None."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found["strength"] if int(found.get("step", -1)) == step else None


def model_description(manifest: dict, normalization: str, scaling: str,
                      info: dict | None = None) -> dict:
    """What a client needs to build requests and read answers: the `describe` "model" value."""
    stats = manifest["features"]["stats"]
    crop = manifest["crop"]
    return {
        "cp2image_tf_version": __version__,
        "feature_names": manifest["features"]["names"],
        "channels": manifest["channels"],
        "crop": [crop["height"], crop["width"], crop["channels"]],
        "normalization": normalization,
        "scaling": scaling,
        "median": stats["median"],
        "sd": stats["std"],
        "treatments": manifest["treatments"]["names"],
        **({"source": info} if info else {}),
    }


def serving_module(decoder, manifest: dict, normalization: str, noise_dim: int = 0,
                   info: dict | None = None, scaling: str = "dataset"):
    """The decoder wrapped with its preprocessing in a tf.Module: the SavedModel's root object.

    Its tf.functions `serve`, `generate_png` and `describe` (and the exemplar model's `edit`)
    are the signatures; generation from a run folder calls the same functions, so both paths
    compute the same graph.
    """
    import tensorflow as tf

    from cp2image_tf.viz import channel_colours
    from tfrecords_tools.reader import feature_normalizer

    median, center, scale = feature_normalizer(manifest, normalization)
    module = tf.Module(name="cp2image")
    # Constants as non-trainable variables: visible in the checkpoint, not baked into graphs.
    module.median = tf.Variable(median, trainable=False, name="median")
    module.center = tf.Variable(center, trainable=False, name="center")
    module.scale = tf.Variable(scale, trainable=False, name="scale")
    module.colours = tf.Variable(channel_colours(manifest["channels"]), trainable=False,
                                 name="colours")
    description = model_description(manifest, normalization, scaling, info)
    functions = add_signatures(module, decoder, manifest["features"]["count"], noise_dim,
                               [json.dumps(description), json.dumps(manifest)],
                               (info or {}).get("edit_strength", 1.0))
    # Track the tf.Variables the traced functions read, not the Keras objects that wrap
    # them: TF1-style loaders (TensorFlow Serving, saved_model_cli run) restore only
    # variables that the object graph holds as tf.Variables.
    used = {}
    for fn in functions:
        for variable in fn.get_concrete_function().variables:
            used.setdefault(id(variable), variable)
    module.used_variables = list(used.values())
    return module


def normaliser(module):
    """normalise(raw features): NaN and inf replaced by the training medians, then
    normalised with the training statistics (module.median, .center, .scale)."""
    import tensorflow as tf

    def normalise(features):
        filled = tf.where(tf.math.is_finite(features), features, module.median)
        return (filled - module.center) / module.scale

    return normalise


def add_signatures(module, decoder, n_features: int, noise_dim: int, describe_values,
                   edit_strength: float = 1.0) -> list:
    """module.serve, .generate_png, .describe and .edit (None but for the exemplar model);
    the list of the functions that draw. `edit` moves its profile `edit_strength` (a number or
    one per feature) times as far from `like` as asked (evaluation/calibration.py)."""
    import tensorflow as tf

    from cp2image_tf.training.exemplar.bank import is_exemplar_decoder
    from cp2image_tf.training.exemplar.folded import make_folded

    features_spec = tf.TensorSpec([None, n_features], tf.float32, name="features")
    normalise = normaliser(module)
    exemplar = is_exemplar_decoder(decoder)
    # The exemplar model is served through its folded graph (training/exemplar/folded.py):
    # the same image in fewer ops, which is most of its batch-1 time on a CPU.
    module.folded = make_folded(decoder) if exemplar else None

    def images(features):
        z = normalise(features)
        if exemplar:
            return module.folded.draw(z)
        if noise_dim:
            # Served images are the noise's mean (zero): one deterministic cell per profile.
            z = [z, tf.zeros([tf.shape(z)[0], noise_dim])]
        return decoder(z, training=False)  # its last layer clips to [0, 1]

    @tf.function(input_signature=[features_spec])
    def serve(features):
        return {"images": images(features)}

    @tf.function(input_signature=[features_spec])
    def generate_png(features):
        rgb = tf.tensordot(images(features), module.colours, axes=[[3], [0]])
        rgb = tf.cast(tf.round(tf.clip_by_value(rgb, 0.0, 1.0) * 255.0), tf.uint8)
        png = tf.map_fn(tf.io.encode_png, rgb, fn_output_signature=tf.string)
        return {"png_bytes": png}

    module.serve, module.generate_png = serve, generate_png
    module.describe = describe_fn(describe_values)
    module.edit = None
    if exemplar:
        strength = np.broadcast_to(np.asarray(edit_strength, np.float32), [n_features])
        module.edit_strength = tf.Variable(strength, trainable=False, name="edit_strength")

        @tf.function(input_signature=[features_spec, tf.TensorSpec([None, n_features], tf.float32,
                                                                   name="like")])
        def edit(features, like):
            """The features drawn as an edit of the training cell nearest `like` (a pinned
            exemplar: one cell changing along a traversal), the change from `like` taken
            module.edit_strength times (calibrated after fit)."""
            z, pinned = normalise(features), normalise(like)
            z = pinned + module.edit_strength * (z - pinned)
            return {"images": module.folded.draw(z, pinned)}

        module.edit = edit
    return [serve, generate_png] + ([module.edit] if exemplar else [])


def describe_fn(describe_values):
    """The `describe` signature: key string [B] -> value string [B] (DESCRIBE_KEYS)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="key")])
    def describe(key):
        keys = tf.constant(DESCRIBE_KEYS)
        values = tf.constant(describe_values)
        match = tf.equal(key[:, None], keys[None, :])
        found = tf.reduce_any(match, axis=1)
        value = tf.gather(values, tf.argmax(tf.cast(match, tf.int32), axis=1))
        return {"value": tf.where(found, value, tf.fill(tf.shape(key), ""))}

    return describe


def next_version(model_base: Path) -> int:
    """One more than the highest numeric version folder (1 for an empty base)."""
    versions = [int(p.name) for p in model_base.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_base.is_dir() else []
    return max(versions, default=0) + 1


def export(run_dir, model_base, version: int | None = None, checkpoint: str = "best",
           warmup: bool = True) -> dict:
    """Export a run's decoder to MODEL_BASE/<version>; returns a summary with the path.

    The version is the next integer when not given; an existing version is an error.
    """
    import tensorflow as tf

    model_base = Path(model_base)
    if model_base.exists() and not model_base.is_dir():
        raise UserInputError(f"{model_base}: exists and is not a folder; MODEL_BASE is the folder "
                             "that holds numbered versions.")
    if version is not None and version < 1:
        raise UserInputError(f"--version {version}: versions are positive integers.")
    decoder, manifest, config, info = load_run(run_dir, checkpoint)
    model_base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_base)
    target = model_base / str(version)
    if target.exists():
        raise UserInputError(f"{target}: version {version} exists; versions are never overwritten. "
                             "Leave out --version to write the next one.")

    module = serving_module(decoder, manifest, config.normalization, config.noise_dim, info,
                            config.scaling)
    remove_stale_partials(model_base)
    work = partial_folder(model_base, str(version))
    try:
        staging = work / "assets-staging"
        staging.mkdir()
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (staging / "feature_names.txt").write_text("\n".join(manifest["features"]["names"]) + "\n")
        export_info = {**info, "normalization": config.normalization, "scaling": config.scaling,
                       "noise_dim": config.noise_dim,
                       "cp2image_tf_version": __version__, "tensorflow_version": tf.__version__,
                       "version": version,
                       "signatures": {"serving_default": "features -> images",
                                      "generate_png": "features -> png_bytes",
                                      "describe": "key -> value"}}
        if module.edit is not None:
            export_info["signatures"]["edit"] = "features, like -> images"
        (staging / "export.json").write_text(json.dumps(export_info, indent=1) + "\n")
        module.assets = [tf.saved_model.Asset(str(staging / name))
                         for name in ("manifest.json", "feature_names.txt", "export.json")]
        saved = work / "model"
        signatures = {"serving_default": module.serve, "generate_png": module.generate_png,
                      "describe": module.describe}
        if module.edit is not None:
            signatures["edit"] = module.edit
        tf.saved_model.save(module, str(saved), signatures=signatures)
        if warmup:
            write_warmup(saved / "assets.extra" / WARMUP_FILE, manifest)
        os.rename(saved, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": str(target), "version": version, **export_info}


def warmup_requests(manifest: dict) -> list:
    """PredictionLog protos: the training medians at a few batch sizes, for each signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import (model_pb2, predict_pb2, prediction_log_pb2)

    median = np.asarray(manifest["features"]["stats"]["median"], dtype=np.float32)
    logs = []
    for signature, batches in (("serving_default", WARMUP_BATCHES), ("generate_png", (1, 8))):
        for batch in batches:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=signature))
            request.inputs["features"].CopyFrom(
                tf.make_tensor_proto(np.tile(median, (batch, 1))))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup(path: Path, manifest: dict) -> None:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in warmup_requests(manifest):
            writer.write(log.SerializeToString())
