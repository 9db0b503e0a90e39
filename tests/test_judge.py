"""Judge rounds: the measurer learns what cp-measure reads in the decoder's own edits."""
import json

import numpy as np
import pytest

from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.shared.judge import (calibration_slopes, change_agreement, judge_labels,
                                         judged_reliability)
from cp2image_tf.training.train import fit
from tfrecords_tools.errors import UserInputError


def test_labels_are_the_exemplars_profile_moved_by_the_calibrated_change():
    rng = np.random.default_rng(0)
    n = 40
    measured_ex = rng.normal(size=(n, 3)) * [1.0, 10.0, 1.0]
    measured_ex[:, 2] = 4.0  # cp-measure gives a constant: no slope to learn from
    exemplar = rng.normal(size=(n, 4)).astype(np.float32)
    columns = [0, 2, 3]  # feature 1 cannot be measured again
    # CellProfiler's standardised values are 2 x and 0.1 x cp-measure's, plus offsets.
    exemplar[:, 0] = 2.0 * measured_ex[:, 0] + 1.0
    exemplar[:, 2] = 0.1 * measured_ex[:, 1] - 3.0
    slopes, usable = calibration_slopes(exemplar[:, columns], measured_ex)
    np.testing.assert_allclose(slopes[:2], [2.0, 0.1], rtol=1e-5)
    assert usable.tolist() == [True, True, False]
    change = rng.normal(size=(n, 3))
    measured_edit = measured_ex + change
    measured_edit[5, 0] = np.nan  # no nucleus found in edit 5
    labels, weights = judge_labels(exemplar, measured_ex, measured_edit, columns)
    expected0 = np.clip(exemplar[:, 0] + 2.0 * change[:, 0], -5, 5)
    expected0[5] = exemplar[5, 0]
    np.testing.assert_allclose(labels[:, 0], expected0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(labels[:, 2], np.clip(exemplar[:, 2] + 0.1 * change[:, 1], -5, 5),
                               rtol=1e-5, atol=1e-5)
    # Unmeasurable and constant features keep the exemplar's value, with weight 0.
    np.testing.assert_array_equal(labels[:, [1, 3]], exemplar[:, [1, 3]])
    assert weights[:, 0].sum() == n - 1 and weights[5, 0] == 0
    assert weights[:, 2].all() and not weights[:, [1, 3]].any()


def test_change_agreement_counts_features_the_measurer_follows():
    rng = np.random.default_rng(1)
    judged = rng.normal(size=(50, 3))
    read = np.stack([judged[:, 0], -judged[:, 1], rng.normal(size=50)], 1)
    weights = np.ones_like(judged)
    weights[:, 2] = 0  # nothing known about feature 2
    out = change_agreement(read, judged, weights)
    assert out["features"] == 2 and out["fraction_r_0.7"] == 0.5
    np.testing.assert_allclose(out["median_r"], 0.0, atol=1e-9)


def test_judge_rounds_are_for_the_exemplar_model():
    from cp2image_tf.training.run_folder import config_from_dict

    with pytest.raises(UserInputError, match="judge_rounds 2: .* --model film"):
        config_from_dict({"model": "film", "judge_rounds": 2})
    with pytest.raises(UserInputError, match="at least 8 cells"):
        FitConfig(judge={"rounds": 1, "cells": 4}).validate()
    with pytest.raises(UserInputError, match="judge.every 0: must be at least 1"):
        FitConfig(judge={"every": 0}).validate()
    # The film model has no judge section: its rounds are none.
    assert "judge" not in FitConfig(model="film").to_dict()
    # On by default for the exemplar model, off for the others.
    assert FitConfig().judge_rounds == 3 and FitConfig(model="film").judge_rounds == 0
    FitConfig(model="published").validate()


def _planning_judge(planned_steps: int):
    """A JudgeRounds with only what planning reads: the exemplar model's defaults (a round
    every 400 steps, at most 3), a plan of `planned_steps`, no round done, no pace yet."""
    from types import SimpleNamespace

    import tensorflow as tf

    from cp2image_tf.training.shared.judge import JudgeRounds

    judge = object.__new__(JudgeRounds)
    judge.config = FitConfig()
    judge.trainer = SimpleNamespace(total_steps=tf.Variable(planned_steps),
                                    judge_done=tf.Variable(0), judge_total=tf.Variable(0))
    judge._pace = None
    return judge


@pytest.mark.parametrize("planned_steps, rounds, first_at, size", [
    (300, 0, None, None),        # shorter than judge_every: no round
    (760, 1, 380, (380, 247)),   # about five minutes on the sample data: one, half way
    (2000, 3, 500, (500, 326)),
    (5150, 3, 1288, (768, 500)),  # about 30 minutes: at most judge_rounds, full size
])
def test_a_run_does_one_round_per_judge_every_planned_steps_sized_to_the_steps_between(
        planned_steps, rounds, first_at, size):
    judge = _planning_judge(planned_steps)
    assert judge.planned() == rounds
    due = [step for step in range(planned_steps) if judge.due(step)]
    assert (due[0] if due else None) == first_at
    if size:
        assert judge.size() == size
    # Re-planned shorter (a time limit), the rounds still to come come sooner.
    judge.replan(planned_steps // 2)
    assert judge.total() == planned_steps // 2
    assert judge.planned() == min(3, (planned_steps // 2) // 400)


def test_after_a_round_the_rounds_to_come_are_spaced_over_the_steps_the_time_left_allows():
    judge = _planning_judge(4000)
    now = [100.0]
    judge.clock = lambda: now[0]  # the rounds' clock (JudgeRounds.clock), set by hand
    judge.replan_after_round(1000, 600.0, 10**6)  # no pace yet: the first plan stands
    assert judge.total() == 4000
    judge.start_pace(1)
    # 999 decoder steps at 0.3 s, then a 60-s round (the first of three) at step 1000.
    now[0] += 999 * 0.3 + 60.0
    judge._pace["judged"], judge._pace["rounds"] = 60.0, 1
    judge.trainer.judge_done.assign(1)
    # 600 s left, less two rounds to come at 60 s each: 480 s at 0.3 s a step = 1600 steps.
    judge.replan_after_round(1000, 600.0, 10**6)
    assert judge.total() == 1000 + 1 + 1600
    judge.replan_after_round(1000, 600.0, 2000)  # never beyond --steps
    assert judge.total() == 2000


def test_a_judge_round_measures_edits_and_trains_the_measurer_once(disc_dataset, tmp_path):
    run = tmp_path / "run"
    config = FitConfig(model="exemplar", steps=6, batch_size=8, measurer={"steps": 4},
                       val_cells=16, grid_cells=0,
                       judge={"rounds": 1, "every": 3, "cells": 32, "steps": 3},
                       checkpoint_every=3, validate_every=3)
    summary = fit(disc_dataset, run, config, progress=False)
    rounds = json.loads((run / "judge.json").read_text())
    # One round, half way through the 6 decoder steps, on 32 edits of training cells.
    assert len(rounds) == 1 and rounds == summary["judge"]
    record = rounds[0]
    assert record["round"] == 1 and record["decoder_step"] == 3 and record["cells"] == 32
    # Both disc features (area, mean DNA) are measured again; most edits hold a nucleus.
    assert record["measured_features"] == 2 and record["labelled_share"] > 0.5
    assert np.isfinite(record["loss"]) and record["steps"] == 3
    # Resumed to more steps, the round is not done again.
    again = fit(disc_dataset, run, FitConfig(**{**config.__dict__, "steps": 9}), progress=False)
    assert "judge" not in again and len(json.loads((run / "judge.json").read_text())) == 1


class SimulatedClock:
    """Seconds that pass only when the run does something: `per_step` for each decoder,
    measurer or judge step, whatever the machine's load (the time limit's test)."""

    def __init__(self, per_step: float):
        self.now, self.per_step = 0.0, per_step

    def __call__(self) -> float:
        return self.now

    def ticking(self, make_step):
        """A trainer's step-function maker whose steps advance the clock."""
        def made():
            step_fn = make_step()

            def step(*args):
                self.now += self.per_step
                return step_fn(*args)
            return step
        return made


@pytest.fixture
def simulated_clock(monkeypatch):
    """fit's time limit, schedule planning and judge rounds timed by a SimulatedClock."""
    import time
    from types import SimpleNamespace

    import cp2image_tf.training.train as train_module
    from cp2image_tf.training.shared.judge import JudgeRounds

    clock = SimulatedClock(per_step=0.2)
    fake_time = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.perf_counter = clock
    monkeypatch.setattr(train_module, "time", fake_time)
    monkeypatch.setattr(JudgeRounds, "clock", staticmethod(clock))
    make_trainer = train_module.make_trainer

    def ticking_trainer(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        for name in ("train_step_fn", "measurer_step_fn", "judge_step_fn"):
            setattr(trainer, name, clock.ticking(getattr(trainer, name)))
        return trainer

    monkeypatch.setattr(train_module, "make_trainer", ticking_trainer)
    return clock


def test_under_a_time_limit_the_rounds_still_to_come_are_spaced_over_the_time_left(
        disc_dataset, tmp_path, simulated_clock):
    run = tmp_path / "run"
    config = FitConfig(model="exemplar", steps=100000, time_limit=40, batch_size=8,
                       val_cells=16, grid_cells=0,
                       judge={"rounds": 2, "every": 10, "cells": 48, "steps": 20},
                       checkpoint_every=1000, validate_every=1000)
    summary = fit(disc_dataset, run, config, progress=False)
    rounds = summary["judge"]
    assert summary["stopped_by"] == "time limit" and len(rounds) == 2
    first, second = (r["decoder_step"] for r in rounds)
    # Each round's seconds are taken out of the rounds' plan when it ends: the second round
    # is at two thirds of the steps the run really took, not of the steps planned before the
    # first round (which the rounds' seconds made the run fall short of). The loss ramps
    # keep the first plan.
    steps = summary["steps"]
    assert 0 < first < second < steps
    assert rounds[0]["planned_steps"] == summary["total_steps"] > steps
    assert 0.75 * steps < rounds[1]["planned_steps"] < 1.25 * steps
    assert 0.5 * steps < second < 0.8 * steps
    assert [(r["cells"], r["steps"]) for r in rounds] == [(48, 20), (48, 20)]
    # Timed by the simulated clock: each round took its 20 judge steps' seconds, and the run
    # ended at the limit.
    assert [r["seconds"] for r in rounds] == [pytest.approx(20 * simulated_clock.per_step)] * 2
    assert 40 <= simulated_clock.now < 40 + simulated_clock.per_step + 1e-9


def test_after_a_round_a_feature_is_trusted_as_far_as_the_measurer_follows_the_judge():
    rng = np.random.default_rng(0)
    judged = rng.normal(size=(40, 4))
    read = judged.copy()
    read[:, 1] = -judged[:, 1]  # read backwards: no trust from the edits
    read[:, 2] = rng.normal(size=40)  # not read at all
    weights = np.ones((40, 4))
    weights[5:, 3] = 0  # five edits of feature 3 measured: too few to judge
    r = judged_reliability([0.2, 0.6, None, 0.5], read, judged, weights)
    # Feature 0: followed exactly (r 1) over a real-crop r of 0.2; feature 1 keeps its real-crop
    # 0.6; feature 2 (undefined on real crops, noise on edits) gets the larger of 0 and a
    # chance r; feature 3 keeps 0.5.
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(0.6) and r[3] == 0.5
    assert 0.0 <= r[2] < 0.4
