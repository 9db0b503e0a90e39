"""The exemplar model's edit strength (evaluation/calibration.py): measured as
controllability measures gains, applied by the served `edit` signature only, kept per
checkpoint."""
import json

import numpy as np
import pytest

from cp2image_tf.evaluation.calibration import STRENGTH_RANGE, measured_gains, strength_of
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
    gains = measured_gains(ScaledEdits(discs, response), discs, cells=4, features=16, seed=0)
    assert sorted(gains) == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_Actin",
                             "Nuclei_Intensity_MeanIntensity_DNA"]
    for name, gain in gains.items():
        assert gain == pytest.approx(response, abs=0.1), name
    strength, gain, moved = strength_of(gains)
    assert moved == 3 and strength == pytest.approx(min(1 / gain, STRENGTH_RANGE[1]))
    assert strength == pytest.approx(1 / response, rel=0.2)


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
    assert found["strength"] == pytest.approx(strength_of(found["gains"])[0], rel=1e-3)
    assert saved_strength(run, best_step) == found["strength"]
    assert saved_strength(run, best_step + 1) is None  # another checkpoint: not calibrated

    # Calibrated at strength 2: its edits are those of strength 1 asked
    # twice as far from `like`; drawing a profile on its own is unchanged.
    (run / CALIBRATION).write_text(json.dumps({**found, "strength": 2.0}))
    assert load_run(run)[3]["edit_strength"] == 2.0
    plain, doubled = load_model(run, calibrated=False), load_model(run)
    assert doubled.description["source"]["edit_strength"] == 2.0
    rng = np.random.default_rng(0)
    like = plain.median[None] + plain.sd[None] * rng.normal(size=(3, len(plain.median)))
    asked = like + plain.sd[None] * rng.normal(size=like.shape)
    like, asked = like.astype(np.float32), asked.astype(np.float32)
    np.testing.assert_allclose(doubled.edits(asked, like),
                               plain.edits(like + 2 * (asked - like), like), atol=2e-5)
    np.testing.assert_array_equal(doubled.images(asked), plain.images(asked))
    assert np.abs(doubled.edits(asked, like) - plain.edits(asked, like)).max() > 1e-3
