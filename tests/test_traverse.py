"""traverse and generate: the correlated direction (the default), the feature alone, and the
inputs they refuse or warn about (a NaN or infinite range, too many steps, values far beyond
the training range)."""
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from cp2image_tf.drawing import traverse as trav
from cp2image_tf.drawing.generate import generate
from cp2image_tf.drawing.traverse import (correlated_offsets, correlations_with,
                                          feature_correlations_with, montage_steps,
                                          traversal_profiles, traverse)
from cp2image_tf.serving.local import load_model
from tfrecords_tools.errors import UserInputError

AREA, DNA = "Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"


@pytest.fixture(scope="module")
def model(disc_run):
    return load_model(disc_run)


def test_correlated_offsets_are_the_regression_on_the_chosen_features():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(5, 5))
    z = rng.normal(size=(20000, 5)) @ mix
    z = ((z - z.mean(0)) / z.std(0)).astype(np.float32)
    rows = correlations_with(z, [0, 1, 2, 3, 4])
    # One feature: its correlation row times the offset, itself exactly as asked.
    one = correlated_offsets(rows[[2]], [2], [1.5])
    np.testing.assert_allclose(one, np.r_[1.5 * rows[2, :2], 1.5, 1.5 * rows[2, 3:]], atol=1e-12)
    # Two: the chosen ones as asked; the others the least-squares prediction from them
    # (up to the shrinkage of the chosen ones' correlation with each other).
    two = correlated_offsets(rows[[0, 3]], [0, 3], [1.0, -2.0])
    assert two[0] == 1.0 and two[3] == -2.0
    coef = np.linalg.lstsq(z[:, [0, 3]], z[:, [1, 2, 4]], rcond=None)[0]
    expected = np.array([1.0, -2.0]) @ coef
    assert np.abs(two[[1, 2, 4]] - expected).max() < 0.15 * np.abs(expected).max()
    # Two copies of one feature asked to move apart do not push the rest without bound.
    copies = np.c_[z[:, :1], z[:, :1] * 0.999 + 0.001 * z[:, 1:2], z[:, 2:]]
    apart = correlated_offsets(correlations_with(copies, [0, 1]), [0, 1], [2.0, -2.0])
    assert np.abs(apart[2:]).max() < 20


def test_traverse_moves_correlated_features_by_default_and_alone_with_the_flag(model, disc_dataset,
                                                                              tmp_path):
    rho = feature_correlations_with(disc_dataset, model, [0])[0, 1]
    assert rho > 0.3  # large discs are brighter
    zs = np.array([-1.0, 0.0, 1.0])
    traverse(model, tmp_path / "default", [AREA], start=-1, stop=1, steps=3, data=disc_dataset,
             extrapolate=True)
    default = pd.read_csv(tmp_path / "default" / "traverse.csv")
    np.testing.assert_allclose(default[DNA], model.median[1] + zs * rho * model.sd[1], rtol=1e-4)
    np.testing.assert_allclose(default[AREA], model.median[0] + zs * model.sd[0], rtol=1e-5)
    # The same direction as traversal_profiles with the correlation row (explore's strips).
    move = correlated_offsets(feature_correlations_with(disc_dataset, model, [0]), [0], [1.0])
    expected = traversal_profiles(model.median.astype(np.float64), 0, move, model.sd, zs)
    np.testing.assert_allclose(default[[AREA, DNA]].to_numpy(), expected, rtol=1e-5)
    traverse(model, tmp_path / "alone", [AREA], start=-1, stop=1, steps=3, data=disc_dataset,
             alone=True, extrapolate=True)
    alone = pd.read_csv(tmp_path / "alone" / "traverse.csv")
    np.testing.assert_allclose(alone[DNA], model.median[1], rtol=1e-6)
    np.testing.assert_allclose(alone[AREA], default[AREA], rtol=1e-6)
    # --correlated is the default kept by name; without --data the feature moves alone, said.
    result = CliRunner().invoke(main, ["traverse", str(model_path(model)), str(tmp_path / "cli"),
                                       "--feature", AREA, "--steps", "3", "--correlated",
                                       "--data", str(disc_dataset)])
    assert result.exit_code == 0, result.output
    with pytest.warns(UserWarning, match="moving each feature alone.*--data DATA_DIR"):
        traverse(model, tmp_path / "nodata", [AREA], start=-1, stop=1, steps=3, extrapolate=True)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "nodata" / "traverse.csv")[DNA],
                               model.median[1], rtol=1e-6)
    with pytest.raises(UserInputError, match="--correlated and --alone"):
        traverse(model, tmp_path / "both", [AREA], data=disc_dataset, correlated=True, alone=True)


def model_path(model) -> str:
    return model.source.split(" ")[1]


@pytest.mark.parametrize("args, named", [
    (["--from", "nan"], "--from nan"),
    (["--to", "inf"], "--to inf"),
    (["--from", "-inf", "--to", "nan"], "--from -inf"),
    (["--steps", "5000"], "--steps 5000: at most 1000"),
    (["--steps", "1"], "--steps 1: at least 2"),
])
def test_traverse_refuses_a_range_that_is_not_finite_or_too_many_steps(disc_run, tmp_path, args,
                                                                       named):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["traverse", str(disc_run), str(out), "--feature", AREA,
                                       *args])
    assert result.exit_code == 1, result.output
    assert named in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_many_steps_keep_every_step_in_the_stacks_and_a_capped_montage(model, tmp_path):
    assert list(montage_steps(7)) == list(range(7))
    shown = montage_steps(40)
    assert len(shown) == trav.MONTAGE_STEPS and shown[0] == 0 and shown[-1] == 39
    assert len(set(shown)) == len(shown)
    for steps in (trav.MONTAGE_STEPS, 40):
        traverse(model, tmp_path / str(steps), [AREA], steps=steps, alone=True)
    with tifffile.TiffFile(tmp_path / "40" / "traverse_Nuclei_AreaShape_Area.tif") as tif:
        assert tif.series[0].shape[0] == 40
    assert len(pd.read_csv(tmp_path / "40" / "traverse.csv")) == 40
    widths = [Image.open(tmp_path / str(s) / "traverse.png").size[0]
              for s in (trav.MONTAGE_STEPS, 40)]
    assert widths[0] == widths[1]  # 25 tiles across either way


def test_generate_warns_about_values_far_beyond_the_training_range(model, tmp_path):
    table = pd.DataFrame({AREA: [float(model.median[0]), 1e30, -1e30],
                          DNA: [float(model.median[1])] * 3})
    table.to_csv(tmp_path / "profiles.csv", index=False)
    with pytest.warns(UserWarning) as caught:
        generate(model, tmp_path / "profiles.csv", tmp_path / "far")
    [message] = [str(w.message) for w in caught if "beyond" in str(w.message)]
    assert "2 value(s) in 1 feature(s)" in message and AREA in message and DNA not in message
    assert "1e+30" in message
    # Values within the range: no warning.
    table.iloc[[0]].to_csv(tmp_path / "near.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, tmp_path / "near.csv", tmp_path / "near")
    result = CliRunner().invoke(main, ["generate", model_path(model), str(tmp_path / "profiles.csv"),
                                       str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert f"Warning: {tmp_path / 'profiles.csv'}: 2 value(s) in 1 feature(s)" in result.output
    assert AREA in result.output
