"""The tf.data reader: normalisation, scaling choices, stratified batches, sharding."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import CHANNELS, make_cellprofiler_folder
from tfrecords_tools.convert import ConvertConfig, convert
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.reader import make_dataset, scale_crops


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    cp_dir = make_cellprofiler_folder(root, n_fields=24, cells_per_field=4,
                                      treatments=("A", "B", "C"), edge_cell=False)
    out = root / "data"
    manifest = convert(ConvertConfig(input=str(cp_dir), out_dir=str(out), channels=list(CHANNELS),
                                     objects=["Nuclei", "Cells"], crop_size=32, shard_size=8),
                       progress=False)
    return out, manifest


def all_of(ds):
    feats, crops, metas = [], [], []
    for batch in ds:
        feats.append(batch[0].numpy())
        crops.append(batch[1].numpy())
        if len(batch) > 2:
            metas.append({k: v.numpy() for k, v in batch[2].items()})
    return np.concatenate(feats), np.concatenate(crops), metas


def test_standardised_features_and_median_imputation(dataset):
    out, m = dataset
    feats, _, metas = all_of(make_dataset(out, "train", 16, with_metadata=True, repeat=False))
    raw = np.concatenate([b["raw_features"] for b in metas])
    assert feats.shape == (m["counts"]["splits"]["train"], m["features"]["count"])
    stats = m["features"]["stats"]
    expected = (np.where(np.isfinite(raw), raw, stats["median"]) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(feats).all()
    # The NaN in Nuclei_Intensity_MeanIntensity_DNA became the training median, not 0 or NaN.
    assert (~np.isfinite(raw)).sum() == 1
    np.testing.assert_allclose(np.nanmean(np.where(np.isfinite(raw), raw, np.nan), 0), stats["mean"],
                               rtol=1e-5)


def test_robust_normalisation(dataset):
    out, m = dataset
    feats, _, metas = all_of(make_dataset(out, "train", 16, with_metadata=True, repeat=False,
                                           normalization="robust"))
    raw = np.concatenate([b["raw_features"] for b in metas])
    s = m["features"]["stats"]
    expected = (np.where(np.isfinite(raw), raw, s["median"]) - s["median"]) / (1.4826 * np.asarray(s["mad"]))
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling", ["dataset", "dtype", "crop_max", "none"])
def test_crop_scaling_choices(dataset, scaling):
    out, m = dataset
    _, crops, _ = all_of(make_dataset(out, "val", 8, scaling=scaling))
    _, raw, _ = all_of(make_dataset(out, "val", 8, raw_crops=True))
    assert raw.dtype == np.uint16 and crops.dtype == np.float32
    raw = raw.astype(np.float64)
    if scaling == "dataset":
        high = np.array([m["intensity"][ch]["high"] for ch in CHANNELS])
        expected = np.clip(raw / high, 0, 1)
    elif scaling == "dtype":
        expected = raw / 65535.0
    elif scaling == "crop_max":
        expected = raw / raw.max(axis=(1, 2), keepdims=True)
        assert np.allclose(crops.max(axis=(1, 2)), 1.0)
    else:
        expected = raw
    np.testing.assert_allclose(crops, expected, rtol=1e-6)


def test_dataset_scaling_keeps_brightness_differences(dataset):
    """Per-crop max scaling erases a cell's absolute brightness; dataset scaling keeps it."""
    out, m = dataset
    _, raw, _ = all_of(make_dataset(out, "val", 8, raw_crops=True))
    dim = tf.constant(raw[:1] // 4)
    bright = tf.constant(raw[:1])
    for scaling, same in (("crop_max", True), ("dataset", False)):
        a = scale_crops(dim, m, scaling).numpy()
        b = scale_crops(bright, m, scaling).numpy()
        assert np.allclose(a, b, atol=1e-3) == same


def test_stratified_batches_hold_one_cell_per_treatment(dataset):
    out, m = dataset
    treatments = [t for t in m["treatments"]["names"] if m["counts"]["treatments"]["train"][t]]
    ds = make_dataset(out, "train", len(treatments), stratify=True, with_metadata=True, seed=1)
    for _, crops, meta in ds.take(20):
        assert sorted(meta["treatment"].numpy().tolist()) == sorted(t.encode() for t in treatments)
        assert crops.shape == (len(treatments), 32, 32, 3)


def test_eval_split_reads_each_cell_once_in_order(dataset):
    out, m = dataset
    _, _, metas = all_of(make_dataset(out, "test", 5, with_metadata=True))
    ids = np.concatenate([b["cell_id"] for b in metas])
    assert len(ids) == len(set(ids)) == m["counts"]["splits"]["test"]
    _, _, again = all_of(make_dataset(out, "test", 5, with_metadata=True))
    assert (np.concatenate([b["cell_id"] for b in again]) == ids).all()


def test_input_context_shards_between_pipelines(dataset):
    out, m = dataset
    seen = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        _, _, metas = all_of(make_dataset(out, "train", 4, with_metadata=True, shuffle=False,
                                          repeat=False, input_context=ctx))
        seen.append(set(np.concatenate([b["cell_id"] for b in metas]).tolist()))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == m["counts"]["splits"]["train"]


MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfrecords_tools.reader import make_dataset
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
dist = strategy.distribute_datasets_from_function(
    lambda ctx: make_dataset(sys.argv[1], "train", ctx.get_per_replica_batch_size(8),
                             input_context=ctx, with_metadata=True))
features, crops, meta = next(iter(dist))
shapes = [tuple(t.shape) for t in strategy.experimental_local_results(crops)]
ids = [set(t.numpy().tolist()) for t in strategy.experimental_local_results(meta["cell_id"])]
print(strategy.num_replicas_in_sync, shapes, len(ids[0] | ids[1]))
"""


def test_under_mirrored_strategy_with_two_logical_devices(dataset):
    import subprocess
    import sys

    out, _ = dataset
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "2 [(4, 32, 32, 3), (4, 32, 32, 3)] 8"


def test_bad_split_and_scaling_are_clear(dataset):
    out, _ = dataset
    with pytest.raises(UserInputError, match="split 'training'"):
        make_dataset(out, "training")
    with pytest.raises(UserInputError, match="scaling 'max'"):
        make_dataset(out, "val", scaling="max")
