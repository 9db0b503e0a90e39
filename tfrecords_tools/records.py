"""The record format: one tf.train.Example per cell.

    features         bytes  float32 little-endian [F], raw CellProfiler values
                            (NaN/inf kept; the reader imputes them)
    crop             bytes  the crop in its source dtype, little-endian, H x W x C
    cell_id          bytes  '<ImageNumber>-<ObjectNumber>' (or the table's row id)
    image_number     int64
    object_number    int64
    treatment        bytes
    treatment_index  int64  index into manifest["treatments"]["names"]
    group            bytes  the --split-by key

Raw bytes rather than float lists: decode_raw of a whole batch is the cheapest
parse there is.
"""
from __future__ import annotations

import numpy as np

from tfrecords_tools.tfrecord_io import serialize_example

RECORD_KEYS = ("features", "crop", "cell_id", "image_number", "object_number",
               "treatment", "treatment_index", "group")


def encode_example(features: np.ndarray, crop: np.ndarray, cell_id: str, image_number: int,
                   object_number: int, treatment: str, treatment_index: int, group: str) -> bytes:
    """One cell as serialized tf.train.Example bytes (no TensorFlow import)."""
    return serialize_example({
        "features": np.asarray(features, dtype="<f4").tobytes(),
        "crop": np.ascontiguousarray(crop, dtype=crop.dtype.newbyteorder("<")).tobytes(),
        "cell_id": str(cell_id).encode(),
        "image_number": int(image_number),
        "object_number": int(object_number),
        "treatment": str(treatment).encode(),
        "treatment_index": int(treatment_index),
        "group": str(group).encode(),
    })


def encode_examples(features: np.ndarray, crops: np.ndarray, cell_ids, image_numbers,
                    object_numbers, treatment: str, treatment_index: int, groups) -> list[bytes]:
    """The records of a batch of cells (features [n, F], crops [n, H, W, C]): the very bytes
    encode_example gives each cell, made with one conversion of each array for the batch."""
    features = np.ascontiguousarray(features, dtype="<f4").reshape(len(crops), -1)
    crops = np.ascontiguousarray(crops, dtype=crops.dtype.newbyteorder("<"))
    feature_rows, crop_rows = memoryview(features).cast("B"), memoryview(crops).cast("B")
    row_f, row_c = features[0].nbytes if len(features) else 0, crops[0].nbytes if len(crops) else 0
    treatment = str(treatment).encode()
    return [serialize_example({
        "features": feature_rows[i * row_f:(i + 1) * row_f],
        "crop": crop_rows[i * row_c:(i + 1) * row_c],
        "cell_id": str(cell_ids[i]).encode(),
        "image_number": int(image_numbers[i]),
        "object_number": int(object_numbers[i]),
        "treatment": treatment,
        "treatment_index": int(treatment_index),
        "group": str(groups[i]).encode(),
    }) for i in range(len(crops))]


def feature_spec():
    import tensorflow as tf

    return {
        "features": tf.io.FixedLenFeature([], tf.string),
        "crop": tf.io.FixedLenFeature([], tf.string),
        "cell_id": tf.io.FixedLenFeature([], tf.string),
        "image_number": tf.io.FixedLenFeature([], tf.int64),
        "object_number": tf.io.FixedLenFeature([], tf.int64),
        "treatment": tf.io.FixedLenFeature([], tf.string),
        "treatment_index": tf.io.FixedLenFeature([], tf.int64),
        "group": tf.io.FixedLenFeature([], tf.string),
    }


def decode_example(serialized: bytes, n_features: int, crop_shape, dtype: str) -> dict:
    """One record as numpy values (for checks and tests; the reader uses tf.data)."""
    f = _fields(serialized)

    def one_bytes(key):
        return f[key].bytes_list.value[0]

    features = np.frombuffer(one_bytes("features"), dtype="<f4")
    crop = np.frombuffer(one_bytes("crop"), dtype=np.dtype(dtype).newbyteorder("<"))
    if features.size != n_features or crop.size != int(np.prod(crop_shape)):
        raise ValueError(f"record sizes {features.size} features / {crop.size} pixels do not "
                         f"match the manifest ({n_features} / {int(np.prod(crop_shape))})")
    return {
        "features": features.astype(np.float32),
        "crop": crop.reshape(crop_shape).astype(np.dtype(dtype)),
        "cell_id": one_bytes("cell_id").decode(),
        "image_number": f["image_number"].int64_list.value[0],
        "object_number": f["object_number"].int64_list.value[0],
        "treatment": one_bytes("treatment").decode(),
        "treatment_index": f["treatment_index"].int64_list.value[0],
        "group": one_bytes("group").decode(),
    }


def decode_features(serialized: bytes) -> tuple[str, np.ndarray]:
    """(cell_id, raw features float32 [F]) of one record, leaving its crop alone."""
    f = _fields(serialized)
    return (f["cell_id"].bytes_list.value[0].decode(),
            np.frombuffer(f["features"].bytes_list.value[0], dtype="<f4"))


def _fields(serialized: bytes):
    import tensorflow as tf

    return tf.train.Example.FromString(serialized).features.feature


def iterate_records(path: str, compression: str = ""):
    """Serialized records of one shard, in order."""
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(path, compression_type=compression or None):
        yield record.numpy()
