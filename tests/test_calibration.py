"""The exemplar model's edit strength (evaluation/calibration.py): measured as
controllability measures gains, applied by the served `edit` signature only, kept per
checkpoint."""
import json

import numpy as np
import pytest

from cp2image_tf.evaluation.calibration import (STRENGTH_RANGE, Probe, feature_group,
                                                group_strengths, strength_of, strength_vector)
from cp2image_tf.serving.export import CALIBRATION, saved_strength
from test_controllability import DiscModel, discs  # noqa: F401 - the fixture


class ScaledEdits(DiscModel):
    """The faithful disc drawing of `like` moved `response` times as far as asked: an editor
    whose edits are linear but `response` the size asked."""

    def __init__(self, data, response: float):
        super().__init__(data, "faithful")
        self.response = response

    def edits(self, raw, like):
        like = np.broadcast_to(like, np.shape(raw))
        return self.images(like + self.response * (np.asarray(raw) - like))


@pytest.mark.parametrize("response", [0.5, 1.0])
def test_the_gains_measured_are_the_edits_response_and_the_strength_undoes_it(discs, response):
    model = ScaledEdits(discs, response)
    probe = Probe(model, discs, cells=4, features=16, seed=0)
    gains = probe.gains(np.ones(len(model.feature_names)))
    assert sorted(gains) == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_Actin",
                             "Nuclei_Intensity_MeanIntensity_DNA"]
    for name, gain in gains.items():
        assert gain == pytest.approx(response, abs=0.1), name
    strength, gain, moved = strength_of(gains)
    assert moved == 3 and strength == pytest.approx(min(1 / gain, STRENGTH_RANGE[1]))
    assert strength == pytest.approx(1 / response, rel=0.2)
    # Each group's strength undoes its gain: drawn with them, every feature moves as asked.
    groups = group_strengths(gains, probe.channels)
    assert sorted(groups) == ["Nuclei Intensity Actin", "Nuclei Intensity DNA", "Nuclei size"]
    corrected = probe.gains(strength_vector(model.feature_names, probe.channels, groups, 1.0))
    for name, gain in corrected.items():
        assert gain == pytest.approx(1.0, abs=0.1), name


def test_features_share_a_strength_by_object_kind_and_channel():
    channels = ["DNA", "Actin"]
    assert feature_group("Nuclei_AreaShape_Area", channels) == "Nuclei size"
    assert feature_group("Nuclei_AreaShape_MajorAxisLength", channels) == "Nuclei size"
    assert feature_group("Nuclei_AreaShape_Eccentricity", channels) == "Nuclei shape"
    assert feature_group("Cells_Intensity_MeanIntensity_Actin", channels) == "Cells Intensity Actin"
    assert feature_group("Cells_Texture_Contrast_DNA_3_00_256", channels) == "Cells Texture DNA"
    gains = {"Nuclei_AreaShape_Area": 0.5, "Nuclei_AreaShape_Eccentricity": 0.1,
             "Cells_Intensity_MeanIntensity_Actin": 0.8}
    groups = group_strengths(gains, channels)
    # Eccentricity does not move: its group takes no strength of its own.
    assert groups == {"Nuclei size": 2.0, "Cells Intensity Actin": pytest.approx(1.25)}
    # A second measurement corrects the first: the size group moved 1.25 at strength 2.
    again = group_strengths({"Nuclei_AreaShape_Area": 1.25}, channels, groups)
    assert again == {"Nuclei size": pytest.approx(1.6), "Cells Intensity Actin": pytest.approx(1.25)}
    names = ["Nuclei_AreaShape_Perimeter", "Nuclei_AreaShape_Solidity",
             "Cells_Intensity_MeanIntensity_Actin"]
    np.testing.assert_allclose(strength_vector(names, channels, again, 1.4), [1.6, 1.4, 1.25])


def test_the_strength_undoes_the_moved_features_gain_within_its_range():
    # Features the edits do not move (gain < MOVED) are left out: no scale moves them.
    assert strength_of({"a": 0.4, "b": 0.9, "c": 0.05, "d": -0.3}) == (
        pytest.approx(1 / 0.6), pytest.approx(0.6), 2)
    assert strength_of({"a": 0.3, "b": 0.3})[0] == STRENGTH_RANGE[1]
    assert strength_of({"a": 3.0})[0] == STRENGTH_RANGE[0]
    assert strength_of({"a": 0.0, "b": -0.2, "c": 0.1})[0] == 1.0
    assert strength_of({"a": float("nan")})[0] == 1.0
    assert strength_of({})[0] == 1.0


def test_calibrate_writes_the_checkpoints_strength_and_the_edit_signature_alone_applies_it(
        disc_run, disc_dataset, tmp_path):
    import shutil

    from cp2image_tf.evaluation.calibration import calibrate
    from cp2image_tf.serving.export import load_run
    from cp2image_tf.serving.local import load_model

    run = tmp_path / "run"
    shutil.copytree(disc_run, run)
    found = calibrate(run, disc_dataset, cells=4)
    assert found == json.loads((run / CALIBRATION).read_text())
    best_step = int(json.loads((run / "best" / "best.json").read_text())["step"])
    assert found["step"] == best_step and found["checkpoint"] == "best"
    assert found["features"] == len(found["gains"]) > 0
    assert found["moved_features"] <= found["features"]
    assert found["default"] == pytest.approx(strength_of(found["gains"])[0], rel=1e-3)
    assert len(found["strength"]) == len(json.loads((run / "manifest.json").read_text())[
        "features"]["names"])
    assert saved_strength(run, best_step) == found["strength"]
    assert saved_strength(run, best_step + 1) is None  # another checkpoint: not calibrated

    # Calibrated at strengths 2 and 0.5 (alternate features): its edits are those of strength 1
    # asked that many times as far from `like`; drawing a profile on its own is unchanged.
    strength = np.where(np.arange(len(found["strength"])) % 2, 0.5, 2.0)
    (run / CALIBRATION).write_text(json.dumps({**found, "strength": strength.tolist()}))
    assert load_run(run)[3]["edit_strength"] == strength.tolist()
    plain, doubled = load_model(run, calibrated=False), load_model(run)
    rng = np.random.default_rng(0)
    like = plain.median[None] + plain.sd[None] * rng.normal(size=(3, len(plain.median)))
    asked = like + plain.sd[None] * rng.normal(size=like.shape)
    like, asked = like.astype(np.float32), asked.astype(np.float32)
    np.testing.assert_allclose(doubled.edits(asked, like),
                               plain.edits(like + strength * (asked - like), like), atol=2e-5)
    np.testing.assert_array_equal(doubled.images(asked), plain.images(asked))
    assert np.abs(doubled.edits(asked, like) - plain.edits(asked, like)).max() > 1e-3
