"""convert's batched writing (issue 38): the same bytes and the same exact statistics as the
per-cell code it replaced, in bounded memory; its stage timings."""
import gzip
import hashlib
import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_convert import config_for, read_all
from tfrecords_tools.convert import _ReadAhead, convert, cut_crop, cut_crops, fetch
from tfrecords_tools.features import feature_statistics, merged_quantiles, sorted_part_values
from tfrecords_tools.records import encode_example, encode_examples
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.stages import OVERLAPPED, STAGES, StageTimer
from tfrecords_tools.tfrecord_io import TFRecordWriter, frame_records


def test_medians_are_exact_in_a_small_buffer(tmp_path):
    """Parts read from .npy files a feature at a time (a 1-byte budget) give numpy's exact
    median, MAD, min and max of all the finite values, NaN and inf left out."""
    rng = np.random.default_rng(7)
    parts = [(rng.lognormal(size=(n, 5)) * 100).astype(np.float32) for n in (40, 1, 257, 12)]
    parts[0][3, 1], parts[3][0, 0] = np.nan, -np.inf
    for part in parts:
        part[:, 4] = np.inf
    parts[2][7, 4] = np.nan
    paths = []
    for k, part in enumerate(parts):
        paths.append(tmp_path / f"{k}.values.npy")
        np.save(paths[-1], sorted_part_values(part))
    every = np.concatenate(parts).astype(np.float64)
    got = merged_quantiles(paths, 5, memory_bytes=1)
    for j in range(4):
        finite = every[:, j][np.isfinite(every[:, j])]
        assert got["median"][j] == np.median(finite)
        assert got["mad"][j] == np.median(np.abs(finite - np.median(finite)))
        assert (got["min"][j], got["max"][j]) == (finite.min(), finite.max())
    assert np.isnan(got["median"][4])  # no finite value at all
    expected = feature_statistics(every[:, :4])
    for key in ("median", "mad", "min", "max"):
        np.testing.assert_array_equal(merged_quantiles(paths, 5)[key][:4], expected[key])


def test_batch_records_are_the_per_cell_bytes():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(5, 9)).astype(np.float32)
    features[2, 3] = np.nan
    crops = rng.integers(0, 65535, size=(5, 8, 8, 3)).astype(np.uint16)
    ids, images, objects = [f"{i}-{i * 300}" for i in range(5)], np.arange(5) + 127, np.arange(5) * 300
    groups = ["P1 B02", "P1 B02", "x" * 200, "", "P2"]
    expected = [encode_example(features[i], crops[i], ids[i], images[i], objects[i], "DMSO", 3,
                               groups[i]) for i in range(5)]
    assert encode_examples(features, crops, ids, images, objects, "DMSO", 3, groups) == expected
    # A Fortran-order feature block (as a fancy-indexed column selection gives) is the same.
    assert encode_examples(np.asfortranarray(features), crops, ids, images, objects, "DMSO", 3,
                           groups) == expected


@pytest.mark.parametrize("compression", ["", "GZIP", "ZLIB"])
def test_writer_bytes_and_checksum(tmp_path, compression):
    records = [bytes([k]) * (k * 1000 + 1) for k in range(1, 6)]
    path = tmp_path / "shard.tfrecord"
    with TFRecordWriter(path, compression) as writer:
        writer.write(records[0])
        writer.write_many(records[1:])
    data = path.read_bytes()
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    framed = frame_records(records)
    if compression == "GZIP":  # the very bytes gzip.GzipFile writes (the earlier writer)
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
            handle.write(framed)
        assert data == buffer.getvalue()
    elif compression == "ZLIB":
        assert zlib.decompress(data) == framed
    else:
        assert data == framed


def test_field_crops_are_each_cells_crop():
    stack = np.arange(40 * 50 * 2, dtype=np.uint16).reshape(40, 50, 2)
    xs, ys = np.array([25.0, 4.5, 49.0, 10.2]), np.array([20.0, 3.49, 39.6, 30.5])
    got = cut_crops(stack, xs, ys, 8, "pad")
    for i in range(4):
        np.testing.assert_array_equal(got[i], cut_crop(stack, xs[i], ys[i], 8, "pad"))
    with pytest.raises(ValueError):
        cut_crops(stack, xs, ys, 8, "skip")


def test_convert_reports_its_stages_and_exact_statistics(cp_folder, tmp_path):
    """The manifest's training medians and MADs equal numpy's over the decoded training
    records; the timings name the stages a convert goes through."""
    timings = {}
    convert(config_for(cp_folder, tmp_path / "out"), progress=False, timings=timings)
    manifest, records = read_all(tmp_path / "out")
    train = np.stack([r["features"] for r in records.values() if r["split"] == "train"])
    expected = feature_statistics(train)
    stats = manifest["features"]["stats"]
    np.testing.assert_array_equal(stats["median"], expected["median"])
    np.testing.assert_array_equal(stats["mad"], expected["mad"])
    assert stats["median"][0] == pd.Series(train[:, 0].astype(np.float64)).median()
    assert {"plan", "read", "read-ahead", "checksum", "crop", "histogram", "serialize", "write",
            "statistics"} <= set(timings) <= set(STAGES) | set(OVERLAPPED)
    assert all(seconds >= 0 for seconds in timings.values())
    assert "compress" not in timings  # uncompressed: nothing was compressed


def test_the_read_ahead_gives_each_field_its_own_files_in_order_and_fails_at_its_turn(tmp_path):
    # Three fields of two files each; the third field's second file is missing. The first two
    # come out with exactly the bytes and sha256 of their own files, in order, before the
    # third's turn raises the error naming the missing file.
    paths = []
    for k in range(6):
        path = tmp_path / f"f{k}.bin"
        path.write_bytes(bytes([k]) * (1000 + k))
        paths.append(str(path))
    (tmp_path / "f5.bin").unlink()
    items = [({"paths": paths[2 * i:2 * i + 2]}, {"i": i}) for i in range(3)]
    timer = StageTimer()
    seen = []
    with _ReadAhead({"table": False}, timer) as ahead:
        with pytest.raises(UserInputError, match=f"{paths[5]}: cannot be read here"):
            for fld, batch, fetched in ahead.fields(items):
                assert list(fetched) == fld["paths"]
                for path in fld["paths"]:
                    data, info = fetched[path]
                    assert data == Path(path).read_bytes()
                    assert info == {"bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()}
                    assert (data, info) == fetch(path)
                seen.append(batch["i"])
    assert seen == [0, 1]
    assert timer.seconds["read-ahead"] > 0


def test_a_stage_timed_inside_another_is_taken_out_of_it(monkeypatch):
    import itertools

    import tfrecords_tools.stages as stages

    clock = itertools.count()  # each reading of the clock one second later
    monkeypatch.setattr(stages.time, "perf_counter", lambda: float(next(clock)))
    timer = StageTimer()
    with timer.stage("outer"):          # 0
        with timer.stage("inner"):      # 1
            pass                        # 2: inner took 1
        with timer.stage("inner"):      # 3
            pass                        # 4: inner took 1 more
    # 5: outer took 5, of which 2 inside
    with timer.stage("outer"):          # 6
        pass                            # 7
    assert timer.seconds == {"inner": 2.0, "outer": 4.0}
