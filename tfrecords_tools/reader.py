"""Reading a converted dataset as a tf.data pipeline.

`make_dataset(data_dir, "train", batch_size=104)` gives batches of
(normalised features [B, F] float32, crop [B, H, W, C] float32 in [0, 1]).
Shards are interleaved, records batched and then parsed a whole batch at a time
(decode_raw), shuffled and prefetched.

Crop scaling (`scaling`):
  "dataset"   (default) x / high, clipped to [0, 1], with `high` the training
              split's per-channel intensity percentile from the manifest. Keeps
              each cell's absolute brightness, so intensity features survive.
  "dtype"     x / the dtype's maximum (65535 for 16-bit): CellProfiler's own scaling.
  "crop_max"  each crop's channels divided by their own maximum, as the published
              CP2Image code does; erases brightness differences between cells.
  "none"      the stored values as float32.
Feature normalisation (`normalization`): "standard" (x - mean) / std or
"robust" (x - median) / (1.4826 MAD), both with training-split statistics;
NaN and inf are replaced by the training median first.

Cells as NumPy arrays, for everything that is not a training loop: `iter_cells` streams
(cell id, raw features) without decoding crops; `sample_cells` reads a quota of cells per
treatment (`stratified_quota`) with their crops scaled as a model was trained.
TensorFlow is imported inside the functions that use it.
"""
from __future__ import annotations

import numpy as np

from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest, shard_files
from tfrecords_tools.records import decode_features, feature_spec, iterate_records
from tfrecords_tools.shards import named_read_errors
from tfrecords_tools.splits import SPLITS

SCALINGS = ("dataset", "dtype", "crop_max", "none")
NORMALIZATIONS = ("standard", "robust", "none")
DEFAULT_SCALING, DEFAULT_NORMALIZATION = SCALINGS[0], NORMALIZATIONS[0]


def feature_normalizer(manifest: dict, normalization: str = "standard"):
    """(median, center, scale) float32 vectors: z = (where(finite, x, median) - center) / scale."""
    if normalization not in NORMALIZATIONS:
        raise UserInputError(f"normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}.")
    stats = manifest["features"]["stats"]
    median = np.asarray(stats["median"], dtype=np.float64)
    if normalization == "standard":
        center, scale = np.asarray(stats["mean"]), np.asarray(stats["std"])
    elif normalization == "robust":
        center, scale = median, 1.4826 * np.asarray(stats["mad"])
        # A feature with MAD 0 (mostly one value) falls back to its SD.
        scale = np.where(scale > 0, scale, np.asarray(stats["std"]))
    else:
        center, scale = np.zeros_like(median), np.ones_like(median)
    scale = np.where(scale > 0, scale, 1.0)
    return median.astype(np.float32), center.astype(np.float32), scale.astype(np.float32)


def normalize_features(raw, manifest: dict, normalization: str = "standard"):
    """Raw CellProfiler values [..., F] -> normalised float32 (TensorFlow op)."""
    import tensorflow as tf

    median, center, scale = feature_normalizer(manifest, normalization)
    raw = tf.cast(raw, tf.float32)
    filled = tf.where(tf.math.is_finite(raw), raw, median)
    return (filled - center) / scale


def crop_scale(manifest: dict, scaling: str = "dataset"):
    """Per-channel divisor for 'dataset' / 'dtype' scaling (float32 [C]); None otherwise."""
    if scaling not in SCALINGS:
        raise UserInputError(f"scaling {scaling!r}: choose one of {', '.join(SCALINGS)}.")
    if scaling == "dataset":
        return np.asarray([manifest["intensity"][ch]["high"] for ch in manifest["channels"]],
                          dtype=np.float32)
    if scaling == "dtype":
        return np.full(len(manifest["channels"]), manifest["crop"]["dtype_max"], dtype=np.float32)
    return None


def scale_crops(crops, manifest: dict, scaling: str = "dataset"):
    """Stored crops [..., H, W, C] -> float32, scaled as `scaling` says (TensorFlow op).

    Usable inside a model step too, so that the cast and scaling run on the device.
    """
    import tensorflow as tf

    unsigned = crops.dtype.is_unsigned
    crops = tf.cast(crops, tf.float32)
    divisor = crop_scale(manifest, scaling)
    if divisor is not None:
        # One multiply and one min per pixel: unsigned pixels need no lower clip.
        scaled = crops * (1.0 / divisor)
        return tf.minimum(scaled, 1.0) if unsigned else tf.clip_by_value(scaled, 0.0, 1.0)
    if scaling == "crop_max":
        peak = tf.reduce_max(crops, axis=[-3, -2], keepdims=True)
        return tf.math.divide_no_nan(crops, peak)
    return crops


def _tf_dtype(name: str):
    import tensorflow as tf

    return tf.as_dtype(np.dtype(name).name)


def parse_batch_fn(manifest: dict, scaling: str = "dataset", normalization: str = "standard",
                   with_metadata: bool = False, raw_crops: bool = False):
    """A function: serialized records [B] -> (features, crops) or (features, crops, metadata)."""
    import tensorflow as tf

    spec = feature_spec()
    crop = manifest["crop"]
    shape = [crop["height"], crop["width"], crop["channels"]]
    n_features = manifest["features"]["count"]
    dtype = _tf_dtype(crop["dtype"])

    # XLA fuses cast, scale and clip into one pass over the pixels: ~4x faster on CPU
    # than three separate memory-bound ops (measured in benchmarks/bench_input.py).
    scale = tf.function(lambda c: scale_crops(c, manifest, scaling), jit_compile=True)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        raw = tf.reshape(tf.io.decode_raw(parsed["features"], tf.float32, little_endian=True),
                         [-1, n_features])
        features = normalize_features(raw, manifest, normalization)
        crops = tf.reshape(tf.io.decode_raw(parsed["crop"], dtype, little_endian=True), [-1] + shape)
        if not raw_crops:
            crops = scale(crops)
        if not with_metadata:
            return features, crops
        metadata = {k: parsed[k] for k in ("cell_id", "image_number", "object_number",
                                           "treatment", "treatment_index", "group")}
        metadata["raw_features"] = raw
        return features, crops, metadata

    return parse


def _records(files, compression, shuffle, seed, input_context, cycle_length=8,
             deterministic=None):
    import tensorflow as tf

    files = list(files)
    shard_records = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= n:
            files = files[i::n]
        else:
            shard_records = True
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression or None),
        cycle_length=min(cycle_length, len(files)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=(not shuffle) if deterministic is None else deterministic)
    if shard_records:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


def make_dataset(data_dir, split: str = "train", batch_size: int = 104, *, shuffle: bool | None = None,
                 repeat: bool | None = None, seed: int | None = None, scaling: str = "dataset",
                 normalization: str = "standard", stratify: bool = False,
                 drop_remainder: bool = False, with_metadata: bool = False,
                 raw_crops: bool = False, shuffle_buffer: int = 10_000, input_context=None,
                 manifest: dict | None = None, skip_batches: int = 0):
    """A tf.data.Dataset of batches from one split of a converted dataset.

    shuffle and repeat default to True for "train" and False otherwise.
    stratify=True draws treatment-balanced batches: treatments take turns, so a
    batch of as many cells as there are treatments holds one cell of each (the
    published method's batches); it implies repeat. raw_crops=True emits the
    stored crops uncast (scale them in the model step with `scale_crops`).
    input_context (from strategy.distribute_datasets_from_function) shards the
    input by file, or by record when there are fewer files than pipelines;
    batch_size is then the per-replica batch.
    With a seed the batches are one fixed sequence of it (every stage deterministic);
    skip_batches drops the first ones before decoding them (a resumed training run).
    """
    import tensorflow as tf

    manifest = manifest or load_manifest(data_dir)
    if split not in manifest["counts"]["splits"]:
        raise UserInputError(f"split {split!r}: choose train, val or test.")
    if manifest["counts"]["splits"][split] == 0:
        raise UserInputError(f"{data_dir}: the {split} split is empty; convert with other --split fractions.")
    shuffle = (split == "train") if shuffle is None else shuffle
    repeat = (split == "train") if repeat is None else repeat
    compression = manifest.get("compression", "")
    parse = parse_batch_fn(manifest, scaling, normalization, with_metadata, raw_crops)
    if stratify:
        streams = []
        for treatment in manifest["treatments"]["names"]:
            files = shard_files(manifest, data_dir, split, treatment)
            if not files:
                continue
            n = manifest["counts"]["treatments"][split][treatment]
            stream = _records(files, compression, True, seed, input_context,
                              deterministic=seed is not None)
            streams.append(stream.shuffle(max(1, min(n, shuffle_buffer)), seed=seed).repeat())
        turns = tf.data.Dataset.range(len(streams)).repeat()
        ds = tf.data.Dataset.choose_from_datasets(streams, turns)
    else:
        files = shard_files(manifest, data_dir, split)
        ds = _records(files, compression, shuffle, seed, input_context,
                      deterministic=(not shuffle) or seed is not None)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder or (repeat or stratify))
    if skip_batches:
        ds = ds.skip(skip_batches)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=(not shuffle) or seed is not None)
    return ds.prefetch(tf.data.AUTOTUNE)


def take_cells(data_dir, manifest: dict, split: str, limit: int, *, seed: int | None = None,
               scaling: str = "dataset", normalization: str = "standard", crop_dtype=np.float32):
    """(features [n, F], crops [n, H, W, C] as crop_dtype) of the first `limit` cells of one
    shuffled pass of `split` with `seed` (all of them if fewer): decoded in batches of 256,
    each batch's crops cast as it comes, so a float16 store never holds float32 copies."""
    ds = make_dataset(data_dir, split, 256, shuffle=True, repeat=False, seed=seed,
                      scaling=scaling, normalization=normalization, manifest=manifest)
    feats, crops, total = [], [], 0
    for f, c in ds:
        feats.append(f.numpy())
        crops.append(c.numpy().astype(crop_dtype))
        total += len(f)
        if total >= limit:
            break
    return np.concatenate(feats)[:limit], np.concatenate(crops)[:limit]


def iter_cells(data_dir, manifest: dict, splits=SPLITS, treatment: str | None = None):
    """(cell_id, raw features float32 [F]) of every cell of `splits` (or of one treatment's),
    in shard order; the crops are not decoded. A damaged shard is a UserInputError naming it."""
    with named_read_errors(data_dir, manifest):
        for split in splits:
            for shard in shard_files(manifest, data_dir, split, treatment):
                for record in iterate_records(shard, manifest.get("compression", "")):
                    yield decode_features(record)


def stratified_quota(counts: dict, max_cells: int | None) -> dict:
    """Cells per treatment: an even share of max_cells (unused shares go to the larger ones)."""
    if max_cells is None or max_cells >= sum(counts.values()):
        return dict(counts)
    quota = {t: 0 for t in counts}
    left = max_cells
    open_ = sorted(counts, key=lambda t: counts[t])
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for t in list(open_):
            take = min(share, counts[t] - quota[t], left)
            quota[t] += take
            left -= take
            if quota[t] == counts[t]:
                open_.remove(t)
            if left == 0:
                break
    return quota


def sample_cells(data_dir, manifest: dict, split: str, quota: dict, scaling: str = DEFAULT_SCALING,
                 seed: int | None = None, uint8: bool = False) -> dict:
    """`quota[t]` cells of each treatment t of `split`: raw features, crops scaled as
    `scaling` says (with `uint8`, as round(255 x value), to hold many), treatments, cell ids.

    seed None: the first cells of each treatment's shards, treatment by treatment (reads only
    those). A seed: a seeded random sample of each treatment's cells over the whole split,
    in the order the split streams."""
    pick = _first_cells if seed is None else _random_cells
    raw, crops, treatments, ids = [], [], [], []
    with named_read_errors(data_dir, manifest):
        for batch_crops, meta, chosen in pick(data_dir, manifest, split, quota, scaling, seed):
            batch_crops = batch_crops.numpy()[chosen]
            if uint8:
                batch_crops = np.round(np.clip(batch_crops, 0, 1) * 255).astype(np.uint8)
            batch_treatments, batch_ids = meta["treatment"].numpy(), meta["cell_id"].numpy()
            raw.append(meta["raw_features"].numpy()[chosen])
            crops.append(batch_crops)
            treatments += [batch_treatments[i].decode() for i in chosen]
            ids += [batch_ids[i].decode() for i in chosen]
    if not ids:
        return {"raw": np.zeros((0, manifest["features"]["count"]), np.float32),
                "crops": np.zeros((0,), np.uint8 if uint8 else np.float32),
                "treatments": [], "cell_ids": []}
    return {"raw": np.concatenate(raw), "crops": np.concatenate(crops),
            "treatments": treatments, "cell_ids": ids}


def _first_cells(data_dir, manifest, split, quota, scaling, seed):
    import tensorflow as tf

    parse = parse_batch_fn(manifest, scaling, "none", with_metadata=True)
    for treatment, wanted in quota.items():
        files = shard_files(manifest, data_dir, split, treatment)
        if not wanted or not files:
            continue
        ds = tf.data.TFRecordDataset(files, compression_type=manifest.get("compression") or None)
        for _, batch_crops, meta in ds.take(wanted).batch(256).map(parse):
            yield batch_crops, meta, list(range(len(meta["cell_id"])))


def _random_cells(data_dir, manifest, split, quota, scaling, seed):
    rng = np.random.default_rng(seed)
    counts = manifest["counts"]["treatments"][split]
    keep = {t: set(rng.choice(counts[t], size=k, replace=False).tolist())
            for t, k in quota.items() if k}
    seen = {t: 0 for t in counts}
    ds = make_dataset(data_dir, split, 256, shuffle=False, repeat=False, with_metadata=True,
                      scaling=scaling, normalization="none", manifest=manifest)
    for _, batch_crops, meta in ds:
        chosen = []
        for i, t in enumerate(t.decode() for t in meta["treatment"].numpy()):
            if seen[t] in keep.get(t, ()):
                chosen.append(i)
            seen[t] += 1
        if chosen:
            yield batch_crops, meta, chosen
