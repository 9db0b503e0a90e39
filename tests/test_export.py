"""export, generate and traverse: the SavedModel contract and what users get from a model."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from cli.main import main
from cp2image_tf.serving.export import export, load_run
from cp2image_tf.drawing.generate import generate
from cp2image_tf.drawing.profiles import read_profiles
from cp2image_tf.drawing.traverse import traverse
from cp2image_tf.serving.local import load_model
from tfrecords_tools.errors import UserInputError

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def exported(disc_model):
    return disc_model


def keras_images(run, raw):
    """The Keras decoder on features normalised here with numpy: an independent computation."""
    decoder, manifest, config, _ = load_run(run)
    stats = manifest["features"]["stats"]
    filled = np.where(np.isfinite(raw), raw, np.asarray(stats["median"], np.float32))
    z = (filled - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    return np.clip(decoder(z.astype(np.float32), training=False).numpy(), 0, 1)


def raw_profiles(run, n=5):
    manifest = json.loads((run / "manifest.json").read_text())
    stats = manifest["features"]["stats"]
    rng = np.random.default_rng(0)
    raw = (np.asarray(stats["mean"]) + rng.normal(size=(n, len(stats["mean"])))
           * np.asarray(stats["std"])).astype(np.float32)
    raw[1, 0] = np.nan
    raw[2, 1] = np.inf
    return raw


def test_layout_versions_and_assets(disc_run, exported):
    manifest = json.loads((disc_run / "manifest.json").read_text())
    assert exported.name == "1"
    assert (exported / "saved_model.pb").is_file() and (exported / "variables").is_dir()
    assert (exported / "assets" / "feature_names.txt").read_text().split() == \
        manifest["features"]["names"]
    assert json.loads((exported / "assets" / "manifest.json").read_text()) == manifest
    info = json.loads((exported / "assets" / "export.json").read_text())
    assert info["checkpoint"] == "best" and info["step"] in (18, 36)
    before = (exported / "saved_model.pb").read_bytes()
    with pytest.raises(UserInputError, match="version 1 exists"):
        export(disc_run, exported.parent, version=1)
    assert (exported / "saved_model.pb").read_bytes() == before
    second = export(disc_run, exported.parent, checkpoint="latest", warmup=False)
    assert second["version"] == 2 and second["step"] == 36
    assert sorted(p.name for p in exported.parent.iterdir()) == ["1", "2"]  # nothing half-written


def test_saved_model_cli_show_and_run(disc_run, exported, tmp_path):
    show = subprocess.run([str(BIN / "saved_model_cli"), "show", "--dir", str(exported), "--all"],
                          capture_output=True, text=True, env=ENV, check=True).stdout
    for text in ("signature_def['serving_default']", "inputs['features']", "shape: (-1, 2)",
                 "outputs['images']", "shape: (-1, 48, 48, 2)", "signature_def['generate_png']",
                 "outputs['png_bytes']", "signature_def['describe']"):
        assert text in show, text
    raw = raw_profiles(disc_run, 3)
    np.save(tmp_path / "x.npy", np.nan_to_num(raw, nan=0.0, posinf=0.0))
    subprocess.run([str(BIN / "saved_model_cli"), "run", "--dir", str(exported), "--tag_set",
                    "serve", "--signature_def", "serving_default", "--inputs",
                    f"features={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out")],
                   capture_output=True, text=True, env=ENV, check=True)
    images = np.load(tmp_path / "out" / "images.npy")
    expected = keras_images(disc_run, np.load(tmp_path / "x.npy"))
    assert images.shape == (3, 48, 48, 2)
    np.testing.assert_allclose(images, expected, atol=1e-5)


FRESH = """
import sys, json
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
raw = np.load(sys.argv[2])
np.save(sys.argv[3], model.signatures["serving_default"](features=tf.constant(raw))["images"].numpy())
pngs = model.signatures["generate_png"](features=tf.constant(raw))["png_bytes"].numpy()
np.save(sys.argv[4], np.stack([tf.io.decode_png(p).numpy() for p in pngs]))
value = model.signatures["describe"](key=tf.constant(["model", "nonsense"]))["value"].numpy()
print(json.dumps({"names": json.loads(value[0])["feature_names"], "other": value[1].decode(),
                  "modules": sorted(m for m in sys.modules if m.startswith(("cp2image", "tfrecords")))}))
"""


def test_fresh_process_matches_keras(disc_run, exported, tmp_path):
    from cp2image_tf.viz import composite

    raw = raw_profiles(disc_run, 5)
    np.save(tmp_path / "raw.npy", raw)
    out = subprocess.run([sys.executable, "-c", FRESH, str(exported), str(tmp_path / "raw.npy"),
                          str(tmp_path / "images.npy"), str(tmp_path / "png.npy")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] == []  # plain TensorFlow, no project code
    manifest = json.loads((disc_run / "manifest.json").read_text())
    assert report["names"] == manifest["features"]["names"] and report["other"] == ""
    images = np.load(tmp_path / "images.npy")
    expected = keras_images(disc_run, raw)
    assert np.isfinite(images).all() and images.shape == (5, 48, 48, 2)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    pngs = np.load(tmp_path / "png.npy").astype(int)
    assert pngs.shape == (5, 48, 48, 3)
    assert np.abs(pngs - composite(expected, manifest["channels"]).astype(int)).max() <= 1


def test_warmup_requests_run_against_the_signatures(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    model = tf.saved_model.load(str(exported))
    path = exported / "assets.extra" / "tf_serving_warmup_requests"
    seen = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = model.signatures[request.model_spec.signature_name](**inputs)
        batch = inputs["features"].shape[0]
        assert all(v.shape[0] == batch for v in outputs.values())
        seen.append((request.model_spec.signature_name, batch))
    assert seen == [("serving_default", 1), ("serving_default", 8), ("serving_default", 64),
                    ("generate_png", 1), ("generate_png", 8)]


def test_run_folder_and_saved_model_draw_the_same(disc_run, exported):
    raw = raw_profiles(disc_run, 4)
    from_run = load_model(disc_run)
    from_saved = load_model(exported.parent)  # the model base: highest version
    assert from_run.feature_names == from_saved.feature_names
    np.testing.assert_allclose(from_run.images(raw), from_saved.images(raw), atol=1e-6)
    with pytest.raises(UserInputError, match=r"\[cells, 2\]"):
        from_saved.images(np.zeros((2, 3), np.float32))


def test_generate_from_a_nuclei_table(disc_dataset, exported, tmp_path):
    model = load_model(exported)
    table = pd.read_csv(disc_dataset.parent / "cp" / "Nuclei.csv").head(10)
    table.loc[3, "AreaShape_Area"] = np.nan
    path = tmp_path / "Nuclei.csv"
    table.to_csv(path, index=False)
    with pytest.warns(UserWarning, match=r"1 missing or infinite value\(s\) in 1 feature\(s\).*"
                                         r"Nuclei_AreaShape_Area \(1\)"):
        summary = generate(model, path, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["cells"] == 10 and (out / "montage.png").stat().st_size > 5000
    profiles = pd.read_csv(out / "profiles.csv")
    assert list(profiles["label"][:2]) == ["1-1", "1-2"]
    assert np.allclose(profiles["Nuclei_AreaShape_Area"][:3], table["AreaShape_Area"][:3])
    raw = table[["AreaShape_Area", "Intensity_MeanIntensity_DNA"]].to_numpy(np.float32)
    expected = model.images(raw)
    with tifffile.TiffFile(out / profiles["file"][3]) as tif:
        assert tif.imagej_metadata["Labels"] == ["DNA", "Actin"]
        np.testing.assert_allclose(tif.asarray(), np.moveaxis(expected[3], -1, 0), atol=1e-6)
    # The NaN area was drawn at the training median.
    median = model.median.copy()
    median[1] = raw[3, 1]
    np.testing.assert_allclose(expected[3], model.images(median[None])[0], atol=1e-6)


def test_generate_errors(disc_dataset, exported, tmp_path):
    model = load_model(exported)
    table = pd.read_csv(disc_dataset.parent / "cp" / "Nuclei.csv").head(3)
    table.drop(columns=["Intensity_MeanIntensity_DNA"]).to_csv(tmp_path / "Nuclei.csv", index=False)
    with pytest.raises(UserInputError, match=r"1 of the model's 2 features are not columns of the "
                                             r"table: Nuclei_Intensity_MeanIntensity_DNA"):
        read_profiles(tmp_path / "Nuclei.csv", model.feature_names)
    with pytest.warns(UserWarning, match="training medians"):
        values, _ = read_profiles(tmp_path / "Nuclei.csv", model.feature_names, missing="median")
    assert values["Nuclei_Intensity_MeanIntensity_DNA"].isna().all()
    table.to_csv(tmp_path / "cells.csv", index=False)  # unprefixed columns, no object in the name
    with pytest.raises(UserInputError, match="2 of the model's 2 features"):
        read_profiles(tmp_path / "cells.csv", model.feature_names)
    assert len(read_profiles(tmp_path / "cells.csv", model.feature_names, "Nuclei")[0]) == 3
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(UserInputError, match="exists and is not empty"):
        generate(model, tmp_path / "cells.csv", tmp_path / "out", object_name="Nuclei")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    with pytest.raises(UserInputError, match="treatment"):
        generate(model, None, tmp_path / "t", treatment_mean=["nope"], data=disc_dataset)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_treatment_means_and_traverse(disc_dataset, exported, tmp_path):
    model = load_model(exported)
    summary = generate(model, None, tmp_path / "means", treatment_mean=["all"], data=disc_dataset)
    assert summary["labels"] == ["large mean", "small mean"]  # the manifest's order
    profiles = pd.read_csv(tmp_path / "means" / "profiles.csv")
    # Independent: the disc folder's own table, large discs have the larger areas.
    table = pd.read_csv(disc_dataset.parent / "cp" / "Nuclei.csv")
    large = table.groupby(table["ImageNumber"] % 2 == 0)["AreaShape_Area"].mean()[True]
    assert profiles["Nuclei_AreaShape_Area"][0] > profiles["Nuclei_AreaShape_Area"][1]
    assert abs(profiles["Nuclei_AreaShape_Area"][0] - large) < 0.05 * large

    result = traverse(model, tmp_path / "trav", ["areashape_area"], start=-1, stop=1, steps=3,
                      interpolate=("small", "large"), data=disc_dataset, alone=True)
    assert result["rows"] == ["Nuclei_AreaShape_Area", "small -> large"]
    values = pd.read_csv(tmp_path / "trav" / "traverse.csv")
    area = values["Nuclei_AreaShape_Area"][:3].to_numpy()
    np.testing.assert_allclose(area, model.median[0] + np.array([-1, 0, 1]) * model.sd[0], rtol=1e-5)
    np.testing.assert_allclose(values["Nuclei_Intensity_MeanIntensity_DNA"][:3], model.median[1])
    images = result["images"]
    # The middle tile is the median profile, drawn as the model draws it.
    np.testing.assert_allclose(images[0, 1], model.images(model.median[None])[0], atol=1e-5)
    # The exemplar model edits one training cell per row: the one nearest the row's middle.
    assert model.can_pin
    ends = profiles[["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]].to_numpy()
    middle = values.iloc[4][["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]]
    pinned = model.edits(ends[::-1], middle.to_numpy(np.float32))
    np.testing.assert_allclose(images[1, 0], pinned[0], atol=1e-5)  # small's mean
    np.testing.assert_allclose(images[1, 2], pinned[1], atol=1e-5)  # large's mean
    np.testing.assert_allclose(model.edits(ends, ends), model.images(ends), atol=1e-5)
    with tifffile.TiffFile(tmp_path / "trav" / "traverse_Nuclei_AreaShape_Area.tif") as tif:
        assert tif.series[0].axes == "TCYX" and tif.series[0].shape == (3, 2, 48, 48)
    assert (tmp_path / "trav" / "traverse.png").stat().st_size > 5000
    with pytest.raises(UserInputError, match="Did you mean Nuclei_AreaShape_Area"):
        traverse(model, tmp_path / "bad", ["Nuclei_AreaShape_Areas"])
    with pytest.raises(UserInputError, match="cell 999-9: not in"):
        traverse(model, tmp_path / "bad", ["AreaShape_Area"], base="999-9", data=disc_dataset)


def test_cli_export_generate_traverse(disc_dataset, disc_run, tmp_path):
    runner = CliRunner()
    base = tmp_path / "models"
    result = runner.invoke(main, ["export", str(disc_run), str(base), "--version", "3"])
    assert result.exit_code == 0, result.output
    assert "step" in result.output and (base / "3" / "saved_model.pb").is_file()
    result = runner.invoke(main, ["export", str(disc_run), str(base), "--version", "3"])
    assert result.exit_code == 1 and "never overwritten" in result.output
    assert len(result.output.strip().splitlines()) == 1
    table = disc_dataset.parent / "cp" / "Nuclei.csv"
    result = runner.invoke(main, ["generate", str(base), str(table), str(tmp_path / "g"),
                                  "--limit", "4", "--label-column", "ObjectNumber"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "g" / "cells").iterdir())[0] == "0001_1.tif"
    result = runner.invoke(main, ["generate", str(base), str(tmp_path / "g2")])
    assert result.exit_code == 2 and "--treatment-mean" in result.output
    result = runner.invoke(main, ["traverse", str(base), str(tmp_path / "t"), "--feature",
                                  "Nope"])
    assert result.exit_code == 1 and "--feature Nope: not one of the model's 2 features" in result.output
    result = runner.invoke(main, ["traverse", str(base), str(tmp_path / "t"), "--feature",
                                  "AreaShape_Area", "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "traverse.png").is_file()
    result = runner.invoke(main, ["generate", str(tmp_path), str(table), str(tmp_path / "g3")])
    assert result.exit_code == 1 and "neither a run folder" in result.output


def test_model_of_other_features_than_the_data(exported, cp_folder, tmp_path):
    from tfrecords_tools.convert import ConvertConfig, convert

    other = tmp_path / "other"
    convert(ConvertConfig(input=str(cp_folder), out_dir=str(other), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48), progress=False)
    model = load_model(exported)
    with pytest.raises(UserInputError, match="are not the model's 2"):
        generate(model, None, tmp_path / "o", treatment_mean=["all"], data=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.images(model.median).shape == (1, 48, 48, 2)


def test_correlated_traverse_moves_features_with_their_correlation(disc_dataset, exported,
                                                                   tmp_path):
    from tfrecords_tools.reader import make_dataset

    model = load_model(exported)
    traverse(model, tmp_path / "t", ["Nuclei_AreaShape_Area"], start=-1, stop=1, steps=3,
             correlated=True, data=disc_dataset)
    values = pd.read_csv(tmp_path / "t" / "traverse.csv")
    _, _, meta = next(iter(make_dataset(disc_dataset, "train", 10_000, shuffle=False,
                                        repeat=False, with_metadata=True)))
    raw = meta["raw_features"].numpy().astype(np.float64)
    rho = np.corrcoef(raw[:, 0], raw[:, 1])[0, 1]
    assert rho > 0.3  # large discs are brighter
    np.testing.assert_allclose(values["Nuclei_Intensity_MeanIntensity_DNA"],
                               model.median[1] + np.array([-1, 0, 1]) * rho * model.sd[1],
                               rtol=1e-4)
    np.testing.assert_allclose(values["Nuclei_AreaShape_Area"],
                               model.median[0] + np.array([-1, 0, 1]) * model.sd[0], rtol=1e-5)
    with pytest.raises(UserInputError, match="--correlated needs --data"):
        traverse(model, tmp_path / "u", ["Nuclei_AreaShape_Area"], correlated=True)


def test_generate_from_a_cellprofiler_folder(disc_dataset, exported, tmp_path):
    """An ExportToSpreadsheet folder is joined per cell and drawn like the same rows' table."""
    model = load_model(exported)
    folder = disc_dataset.parent / "cp"
    generate(model, folder, tmp_path / "folder", limit=6)
    generate(model, folder / "Nuclei.csv", tmp_path / "table", limit=6)
    by_folder = pd.read_csv(tmp_path / "folder" / "profiles.csv")
    by_table = pd.read_csv(tmp_path / "table" / "profiles.csv")
    assert list(by_folder["label"][:2]) == ["small 1-1", "small 1-2"]  # Image.csv's treatment
    pd.testing.assert_frame_equal(by_folder[model.feature_names], by_table[model.feature_names])


def test_traverse_stays_within_the_training_range_unless_extrapolating(disc_dataset, exported,
                                                                       tmp_path):
    """No --data needed: the model's manifest holds the training split's min and max."""
    from tfrecords_tools.manifest import load_manifest

    model = load_model(exported)
    stats = load_manifest(disc_dataset)["features"]["stats"]
    traverse(model, tmp_path / "in", ["Nuclei_AreaShape_Area"], start=-10, stop=10, steps=5)
    values = pd.read_csv(tmp_path / "in" / "traverse.csv")
    area = values["Nuclei_AreaShape_Area"].to_numpy()
    assert area[0] == pytest.approx(stats["min"][0], rel=1e-6)
    assert area[-1] == pytest.approx(stats["max"][0], rel=1e-6)
    assert area[2] == pytest.approx(model.median[0], rel=1e-6)
    assert list(values["clamped"]) == [True, True, False, True, True]
    result = CliRunner().invoke(main, ["traverse", str(exported), str(tmp_path / "out"),
                                       "--feature", "AreaShape_Area", "--from", "-10", "--to",
                                       "10", "--steps", "5", "--extrapolate"])
    assert result.exit_code == 0, result.output
    area = pd.read_csv(tmp_path / "out" / "traverse.csv")["Nuclei_AreaShape_Area"].to_numpy()
    np.testing.assert_allclose(area, model.median[0] + np.linspace(-10, 10, 5) * model.sd[0],
                               rtol=1e-5)
    assert area[0] < 0  # a negative area: what --extrapolate asks for

