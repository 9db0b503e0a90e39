"""Judge rounds: the measurer learns how cp-measure reads the decoder's own edits.

The measurer learns CellProfiler's features from real crops; the decoder's edits are not
real crops, and over a run the decoder learns edits that the measurer reads as the asked
profile and cp-measure does not (docs/design/measurer-and-judge.md). A judge round asks cp-measure, the judge `evaluate` uses, what the
edits really changed, and teaches the measurer that:

1. Training profiles are drawn as the decoder trains them (`size()` of them): each an edit of one
   of its nearest bank cells (not itself).
2. The edits and their exemplars are segmented and measured with cp-measure, as `evaluate`
   measures (one segmentation for the dataset, `dataset_segmentation`).
3. cp-measure's units are not the standardised CellProfiler features the measurer reads:
   per feature, the slope of the exemplars' CellProfiler values (standardised) on their
   cp-measure values converts a cp-measure change into a feature change. An edit's label
   is its exemplar's features + slope x (cp-measure(edit) - cp-measure(exemplar)): the
   change the judge saw, from the profile the exemplar really has (`judge_labels`).
   Features cp-measure cannot measure again, or not for that edit (no nucleus found),
   get weight 0.
4. The measurer trains (`size()`) steps on half real training crops (their own
   profiles) and half labelled edits, each in a random one of its eight views, then is
   frozen again. A quarter of the edits is held out to report how far the measurer's
   reading of an edit's change follows the judge's, before and after (judge.json).

A run does one round per `judge.every` decoder steps of its plan (--steps, or what
--time-limit is expected to allow), at most `judge.rounds` (FitConfig's judge section):
n rounds at 1/(n+1), 2/(n+1), ... of the run (under --time-limit the rounds still to come are re-spaced after each
round over the steps the time left allows). A round is sized to the decoder steps between
rounds: as many cells as those steps (at least 64), at most `judge.cells`, and measurer
steps in proportion (`judge.steps` for a round of `judge.cells`), so rounds take about the
same share of any run (docs/design/measurer-and-judge.md). The labelled edits are not kept between rounds or in checkpoints: a
resumed run does the rounds it had not done (judge_done in the checkpoint), with the
decoder it has then.
"""
from __future__ import annotations

import json
import time

import numpy as np

from cp2image_tf.training.shared.measurer import FEATURE_CLIP, defined_r, read_features


def calibration_slopes(table: np.ndarray, measured: np.ndarray, min_cells: int = 20):
    """Per column, the least-squares slope of `table` [N, K] (standardised CellProfiler values)
    on `measured` [N, K] (cp-measure's values of the same crops), over the rows where the
    measurement is finite: (slopes [K], usable [K]). A column with fewer than min_cells finite
    rows or a constant measurement is not usable (slope 0)."""
    table, measured = np.asarray(table, np.float64), np.asarray(measured, np.float64)
    slopes = np.zeros(measured.shape[1], np.float64)
    usable = np.zeros(measured.shape[1], bool)
    for k in range(measured.shape[1]):
        ok = np.isfinite(measured[:, k]) & np.isfinite(table[:, k])
        x, y = measured[ok, k], table[ok, k]
        if ok.sum() >= min_cells and x.std() > 0:
            slopes[k] = np.mean((x - x.mean()) * (y - y.mean())) / x.var()
            usable[k] = True
    return slopes, usable


def judge_labels(exemplar_features: np.ndarray, measured_exemplars: np.ndarray,
                 measured_edits: np.ndarray, columns) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N, F], weights [N, F]) of N edits.

    exemplar_features: the exemplars' standardised features [N, F]; measured_exemplars and
    measured_edits: cp-measure's values [N, K] of the exemplars and of the edits, for the
    features `columns` (K indices into F). label = exemplar's features + slope x (edit's
    measurement - exemplar's), clipped as the measurer's targets are; weight 1 where that is
    known, else 0 (the label is then the exemplar's features)."""
    exemplar_features = np.asarray(exemplar_features, np.float32)
    columns = np.asarray(columns, int)
    slopes, usable = calibration_slopes(exemplar_features[:, columns], measured_exemplars)
    change = np.asarray(measured_edits, np.float64) - np.asarray(measured_exemplars, np.float64)
    known = np.isfinite(change) & usable[None, :]
    labels = exemplar_features.copy()
    weights = np.zeros_like(labels)
    moved = exemplar_features[:, columns] + np.where(known, slopes[None, :] * np.nan_to_num(change), 0.0)
    labels[:, columns] = np.clip(moved, -FEATURE_CLIP, FEATURE_CLIP)
    weights[:, columns] = known
    return labels, weights


def change_r(read_change: np.ndarray, judged_change: np.ndarray, weights: np.ndarray,
             min_cells: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the Pearson r of the measurer's reading of edits' changes with the judge's
    over its weighted edits: (r [F], counted [F]). Counted: at least min_cells weighted edits
    and a judged change that varies. r is 0 where not counted or the reading does not vary."""
    n_features = read_change.shape[1]
    r, counted = np.zeros(n_features, np.float64), np.zeros(n_features, bool)
    for j in range(n_features):
        ok = weights[:, j] > 0
        a, b = read_change[ok, j], judged_change[ok, j]
        if ok.sum() >= min_cells and b.std() > 0:
            counted[j] = True
            if a.std() > 0:
                r[j] = np.corrcoef(a, b)[0, 1]
    return np.nan_to_num(r), counted


def change_agreement(read_change: np.ndarray, judged_change: np.ndarray, weights: np.ndarray,
                     min_cells: int = 10) -> dict:
    """How far the measurer's reading of edits' changes follows the judge's: the median of
    change_r over the counted features and the share at r >= 0.7."""
    r, counted = change_r(read_change, judged_change, weights, min_cells)
    r = r[counted]
    if not len(r):
        return {"features": 0, "median_r": None, "fraction_r_0.7": None}
    return {"features": int(len(r)), "median_r": float(np.median(r)),
            "fraction_r_0.7": float((r >= 0.7).mean())}


def judged_reliability(real_r, read_change: np.ndarray, judged_change: np.ndarray,
                       weights: np.ndarray, min_cells: int = 10) -> list:
    """Per feature, how far the consistency can trust the measurer after a round: the larger
    of its validation r on real crops (`real_r`, None or NaN where undefined) and change_r of
    its reading of held-out edits' changes with the judge's."""
    edit_r, _ = change_r(read_change, judged_change, weights, min_cells)
    return np.fmax(defined_r(real_r), edit_r).tolist()


class JudgeRounds:
    """The judge rounds of one fit: `due(step)` says whether a round is due before decoder step
    step + 1; `run()` does it and returns its record (also appended to RUN_DIR/judge.json)."""

    # The seconds the rounds and the decoder's pace are timed in: a test sets a simulated clock.
    clock = staticmethod(time.perf_counter)

    def __init__(self, trainer, batches, data_dir, manifest: dict, config, run_dir, chief: bool,
                 progress: bool):
        from cp2image_tf.measuring.remeasure import plan_measurement
        from tfrecords_tools.manifest import measured_names

        self.trainer, self.batches, self.data_dir = trainer, batches, data_dir
        self.manifest, self.config, self.run_dir = manifest, config, run_dir
        self.chief, self.progress = chief, progress
        self.names = list(manifest["features"]["names"])
        self.channels = measured_names(manifest)
        self.plan = plan_measurement(self.names, self.channels)
        self.segmentation = None
        # For re-planning under --time-limit (replan_after_round): since the decoder step
        # start_pace was called at, its time, and the rounds after it and their seconds.
        self._pace = None

    def total(self) -> int:
        """The decoder steps the rounds are spaced over: the run's plan, or its re-plan after
        the last round (`replan`)."""
        return int(self.trainer.judge_total.numpy()) or int(self.trainer.total_steps.numpy())

    def planned(self) -> int:
        """The rounds of this run: one per judge.every steps of its plan, at most judge.rounds."""
        return min(self.config.judge.rounds, self.total() // self.config.judge.every)

    def due(self, step: int) -> bool:
        done, rounds = int(self.trainer.judge_done.numpy()), self.planned()
        if done >= rounds:
            return False
        return step >= (done + 1) * self.total() / (rounds + 1)

    def size(self) -> tuple[int, int]:
        """(cells, measurer steps) of the next round: as many cells as decoder steps between
        rounds (at least 64), at most judge.cells; judge.steps for judge.cells cells."""
        config = self.config
        spacing = self.total() // (max(1, self.planned()) + 1)
        cells = min(config.judge.cells, max(64, spacing))
        return cells, int(round(config.judge.steps * cells / config.judge.cells))

    def replan(self, total: int) -> None:
        """Space the rounds still to come over `total` decoder steps (the loss ramps keep the
        run's first plan)."""
        self.trainer.judge_total.assign(max(1, int(total)))

    def start_pace(self, step: int) -> None:
        """Decoder step `step` has just ended: the pace for re-planning counts from here (call
        it after the run's first step in this process, which includes compiling)."""
        self._pace = {"step": step, "time": self.clock(), "judged": 0.0, "rounds": 0}

    def replan_after_round(self, step: int, seconds_left: float, max_steps: int) -> None:
        """After a round under --time-limit: the rounds' minutes were not in the first plan,
        so the rounds still to come are spaced over the decoder steps the time left allows
        at the decoder's pace since start_pace, less the rounds' own time at the pace of the
        rounds since then. Nothing before the pace has a decoder step and a round."""
        pace = self._pace
        if pace is None or not pace["rounds"] or step <= pace["step"]:
            return
        per_step = (self.clock() - pace["time"] - pace["judged"]) / (step - pace["step"])
        per_round = pace["judged"] / pace["rounds"]
        to_come = max(0, self.planned() - int(self.trainer.judge_done.numpy()))
        left = max(0.0, seconds_left - to_come * per_round)
        self.replan(min(max_steps, step + 1 + int(left / max(per_step, 1e-9))))

    def _cells(self, round_index: int, count: int):
        """`count` training cells (clipped standardised features, crops, raw features) in
        a shuffled order of their own."""
        from tfrecords_tools.reader import feature_normalizer, take_cells

        config = self.config
        feats, crops = take_cells(self.data_dir, self.manifest, "train", count,
                                  seed=self.batches.seed(2, round_index), scaling=config.scaling,
                                  normalization=config.normalization)
        _, center, scale = feature_normalizer(self.manifest, config.normalization)
        raw = feats * scale + center
        return np.clip(feats, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32), crops, raw

    def _judged_edits(self, round_index: int, count: int):
        """`count` training profiles drawn as edits and measured with cp-measure with their
        exemplars: (edits, exemplars, the exemplars' features, labels, weights, the measured
        feature columns)."""
        import os

        import tensorflow as tf

        from cp2image_tf.measuring.remeasure import dataset_segmentation, remeasure

        features, crops, raw = self._cells(round_index, count)
        if self.segmentation is None:
            self.segmentation, _ = dataset_segmentation(self.manifest, crops[:1000],
                                                        self.config.scaling, self.plan.objects,
                                                        raw[:1000])
        drawn = [self.trainer.judge_edits(tf.constant(features[i:i + 64]))
                 for i in range(0, len(features), 64)]
        edits, exemplars, exemplar_features = (np.concatenate([np.asarray(d[k]) for d in drawn])
                                               for k in range(3))
        n = len(edits)
        measured = remeasure(np.concatenate([exemplars, edits]), self.plan, self.channels,
                             workers=min(2, os.cpu_count() or 1), segmentation=self.segmentation,
                             progress=self.progress)
        columns = [self.names.index(c) for c in measured.columns]
        values = measured.to_numpy(np.float64)
        labels, weights = judge_labels(exemplar_features, values[:n], values[n:], columns)
        return edits, exemplars, exemplar_features, labels, weights, columns

    def run(self, step: int) -> dict:
        import tensorflow as tf

        trainer, config = self.trainer, self.config
        start = self.clock()
        round_index = int(trainer.judge_done.numpy())
        count, steps = self.size()
        edits, exemplars, exemplar_features, labels, weights, columns = self._judged_edits(
            round_index, count)
        n = len(edits)
        # The last quarter is held out: how far the measurer's reading of an edit's change
        # follows the judge's, before and after the round.
        held = np.arange(n - max(1, n // 4), n)
        learn = np.arange(0, held[0])

        judged = labels[held] - exemplar_features[held]

        def read_change():
            return (read_features(trainer.measurer, edits[held])
                    - read_features(trainer.measurer, exemplars[held]))

        before = change_agreement(read_change(), judged, weights[held])
        strategy = trainer.strategy
        per_replica = config.batch_size // strategy.num_replicas_in_sync
        seed = self.batches.seed(4, round_index)

        def make(ctx):
            ds = tf.data.Dataset.from_tensor_slices((edits[learn], labels[learn], weights[learn]))
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            return ds.shuffle(len(learn), seed=seed).repeat().batch(per_replica, drop_remainder=True)

        edit_iterator = iter(strategy.distribute_datasets_from_function(make))
        real_iterator = self.batches.iterator(self.batches.seed(3, round_index), 0)
        step_fn = trainer.judge_step_fn()
        loss = None
        for s in range(steps):
            loss = step_fn(real_iterator, edit_iterator,
                           tf.constant([config.seed, round_index * 10**6 + 2 * s], tf.int64))
        read = read_change()
        after = change_agreement(read, judged, weights[held])
        # Reliability from the judge: a feature whose edits' changes the measurer reads as
        # cp-measure does (held-out edits) is one it can teach, whatever its real-crop r.
        real_r = getattr(trainer, "reliability_r", None)
        if real_r is not None and config.judge.reliability:
            trainer.set_reliability(judged_reliability(real_r, read, judged, weights[held]),
                                    keep=False)
        trainer.judge_done.assign_add(1)
        seconds = self.clock() - start
        if self._pace is not None:  # a round due at the pace's first step is not counted
            self._pace["judged"] += seconds
            self._pace["rounds"] += 1
        record = {"round": round_index + 1, "decoder_step": step, "planned_steps": self.total(),
                  "cells": n,
                  "measured_features": len(columns),
                  "labelled_share": float(weights[:, columns].mean()) if columns else 0.0,
                  "steps": steps,
                  "loss": None if loss is None else float(loss["judge"]),
                  "held_out_before": before, "held_out_after": after,
                  "seconds": round(seconds, 1)}
        if self.chief:
            path = self.run_dir / "judge.json"
            rounds = json.loads(path.read_text()) if path.is_file() else []
            rounds = [r for r in rounds if r["round"] < record["round"]] + [record]
            path.write_text(json.dumps(rounds, indent=1) + "\n")
        return record
