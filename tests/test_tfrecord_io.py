"""The TensorFlow-free TFRecord writer gives exactly what TensorFlow writes and reads."""
import numpy as np
import tensorflow as tf

from tfrecords_tools.records import encode_example
from tfrecords_tools.tfrecord_io import TFRecordWriter


def tf_example(features, crop, cell_id, image_number, object_number, treatment, t_index, group):
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "features": b(features.astype("<f4").tobytes()), "crop": b(crop.tobytes()),
        "cell_id": b(cell_id.encode()), "image_number": i(image_number),
        "object_number": i(object_number), "treatment": b(treatment.encode()),
        "treatment_index": i(t_index), "group": b(group.encode())}))


def test_example_decodes_to_the_same_message_as_tensorflow_builds():
    rng = np.random.default_rng(0)
    for image_number, object_number in ((1, 1), (300, 70000), (2**40, -5), (0, 127), (128, 16384)):
        features = rng.normal(size=453).astype(np.float32)
        features[3] = np.nan
        crop = rng.integers(0, 65535, (68, 68, 3), dtype=np.uint16)
        args = (features, crop, "7-3", image_number, object_number, "Taxol µM", 4, "B02")
        ours = encode_example(*args)
        expected = tf_example(*args)
        assert tf.train.Example.FromString(ours) == expected
        # Wire-compatible with TensorFlow's own parser, field by field.
        theirs = expected.SerializeToString()
        spec = {k: tf.io.FixedLenFeature([], tf.int64 if k.endswith(("number", "index")) else tf.string)
                for k in expected.features.feature}
        a, b = tf.io.parse_single_example(ours, spec), tf.io.parse_single_example(theirs, spec)
        for key in spec:
            assert a[key].numpy() == b[key].numpy()


def test_written_file_reads_back_with_tensorflow(tmp_path):
    records = [bytes([i]) * (i * 1000 + 1) for i in range(5)]
    for compression in ("", "GZIP"):
        path = tmp_path / f"x{compression}.tfrecord"
        with TFRecordWriter(path, compression) as writer:
            for record in records:
                writer.write(record)
        read = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression or None)]
        assert read == records
    # GZIP output is byte-for-byte reproducible (no timestamp in the header).
    again = tmp_path / "again.tfrecord"
    with TFRecordWriter(again, "GZIP") as writer:
        for record in records:
            writer.write(record)
    assert again.read_bytes() == (tmp_path / "xGZIP.tfrecord").read_bytes()
