"""The measurer: a small CNN that reads standardised CellProfiler features from a crop.

It trains first, on real training crops (each in a random one of its eight turns and mirror
images with measurer_views; symmetry.py), keeping the weights that read the most features
(train_measurer), and is then frozen: the film and exemplar models' feature-consistency loss
asks it to read the drawn cell as the asked profile. Why a learned reader rather than
CellProfiler itself, and how far it can be trusted: docs/design/measurer-and-judge.md.
"""
from __future__ import annotations

import json
import sys

import keras
import numpy as np
from keras import layers

from cp2image_tf.training.shared.layers import LEAK, LogView, strided_features

# Standardised features are clipped to +-FEATURE_CLIP wherever a network reads or learns them.
FEATURE_CLIP = 5.0

def build_measurer(n_features: int, crop_size: int = 68, channels: int = 3, width: int = 32,
                   log_view: bool = False, name: str = "measurer") -> keras.Model:
    """Crop [B, H, W, C] in [0, 1] -> the standardised CellProfiler features [B, F]."""
    image = keras.Input((crop_size, crop_size, channels), name="image")
    seen = LogView(name="log_view")(image) if log_view else image
    activations = strided_features(seen, (width, 2 * width, 4 * width, 4 * width), "conv",
                                    spectral=False)
    x = layers.Flatten(name="flatten")(activations[-1])
    x = layers.Dense(512, name="dense")(x)
    x = layers.LeakyReLU(LEAK, name="dense_lrelu")(x)
    out = layers.Dense(n_features, name="features", dtype="float32")(x)
    return keras.Model(image, out, name=name)


def read_features(measurer, crops: np.ndarray) -> np.ndarray:
    """The measurer's reading [N, F] of crops [N, H, W, C], 256 at a time."""
    return np.concatenate([measurer(crops[i:i + 256], training=False).numpy()
                           for i in range(0, len(crops), 256)])

def defined_r(r) -> np.ndarray:
    """Per-feature r as measurer_report gives it (None or NaN where undefined) as float64,
    0 where undefined."""
    return np.nan_to_num(np.array([np.nan if v is None else v for v in r], np.float64))

def measurer_report(measurer, crops: np.ndarray, features: np.ndarray, names) -> dict:
    """The measurer's validation r per feature, summarised per module (it cannot teach what it
    cannot read): {"median_r", "fraction_r_0.7", "modules": {module: {...}}}, as evaluate
    summarises re-measured features (NaN r counts as 0)."""
    import pandas as pd

    from cp2image_tf.metrics import feature_correlations, module_summary

    predicted = read_features(measurer, crops)
    target = np.clip(features, -FEATURE_CLIP, FEATURE_CLIP)
    r = feature_correlations(pd.DataFrame(target, columns=names),
                             pd.DataFrame(predicted, columns=names), min_cells=2)
    table = module_summary({"measurer": r}).set_index("module")
    per_feature = [None if not np.isfinite(v) else float(v)
                   for v in r["pearson"].reindex(list(names)).to_numpy()]
    modules = {m: {"features": int(row.n_features), "median_r": float(row.median_r),
                   "fraction_r_0.7": float(row.fraction)}
               for m, row in table.iterrows() if m != "all"}
    return {"cells": int(len(crops)), "median_r": float(table.loc["all", "median_r"]),
            "fraction_r_0.7": float(table.loc["all", "fraction"]), "modules": modules,
            "r": per_feature}


def train_measurer(trainer, run) -> dict | None:
    """The measurer's phase, before the decoder's: it learns crops -> features, then is frozen.

    `measurer_steps`, or `measurer_share` of the time limit when one is set. Every
    measurer_check_every steps its validation r is taken; the phase keeps the weights that
    read the most features at r >= 0.7 (then the highest median r) and ends early after
    measurer_patience checks without a better one: on a small training split it over-fits
    early (docs/design/measurer-and-judge.md), and the time it does not need goes to the
    decoder. (A run resumed in
    this phase starts the comparison afresh from its checkpoint.) Writes
    RUN_DIR/measurer.json: the kept measurer's validation r per module, and every check.
    """
    from tqdm import tqdm

    config, clock, validator = run.config, run.clock, run.validator
    n_steps = config.measurer_steps
    budget = None if config.time_limit is None else config.measurer.share * config.time_limit
    done = int(trainer.measurer_step.numpy())
    if int(trainer.measurer_done.numpy()) or done >= n_steps or (
            budget is not None and clock.seconds() >= budget and done):
        return None
    names = trainer.manifest["features"]["names"]

    checks, best = [], {"score": None, "weights": None, "step": None}

    def check() -> bool:
        """Take the validation r at `done`; keep the weights if they read more. True if so."""
        report = measurer_report(trainer.measurer, validator.crops, validator.feats, names)
        checks.append({"step": done, "fraction_r_0.7": report["fraction_r_0.7"],
                       "median_r": report["median_r"]})
        score = (round(report["fraction_r_0.7"], 4), report["median_r"])
        if best["score"] is not None and score <= best["score"]:
            return False
        best.update(score=score, weights=trainer.measurer.get_weights(), step=done)
        return True

    step_fn, iterator, stale = trainer.measurer_step_fn(), None, 0
    bar = tqdm(total=n_steps, initial=done, unit="step", desc="measurer", disable=not run.progress,
               file=sys.stderr, dynamic_ncols=True)
    while done < n_steps and (budget is None or clock.seconds() < budget or not done):
        if done % config.checkpoint_every == 0 or iterator is None:
            iterator = run.batches.measurer(done)
        loss = float(step_fn(iterator)["measurer"])
        done += 1
        bar.update(1)
        if done % config.log_every == 0:
            bar.set_postfix_str(f"loss {loss:.3f}")
        if done % config.measurer.check_every == 0:
            stale = 0 if check() else stale + 1
            if config.measurer.patience and stale >= config.measurer.patience:
                break
    bar.close()
    if not checks or checks[-1]["step"] != done:
        check()
    trainer.measurer.set_weights(best["weights"])
    trainer.measurer_done.assign(1)
    clock.sync()
    report = measurer_report(trainer.measurer, validator.crops, validator.feats, names)
    report.update(steps=done, kept_step=best["step"], checks=checks, split=validator.split)
    trainer.set_reliability(report["r"])
    if validator.chief:
        (run.run_dir / "measurer.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def measurer_phase(trainer, run) -> None:
    """The measurer's phase of a run (train_measurer), checkpointed when it ends or is
    interrupted after a step; its report goes to run.summary["measurer"]. A run resumed after
    the phase reads the measurer's r on real crops again for the judge rounds to come."""
    latest = run.managers[0]
    measured = int(trainer.measurer_step.numpy())
    try:
        report = train_measurer(trainer, run)
    except KeyboardInterrupt:
        if int(trainer.measurer_step.numpy()) > measured:
            run.clock.sync()
            latest.save(checkpoint_number=int(trainer.step.numpy()))
        raise
    if report:
        run.summary["measurer"] = report
        latest.save(checkpoint_number=int(trainer.step.numpy()))
    elif (run.config.judge_rounds and run.config.judge.reliability
          and int(trainer.measurer_done.numpy())):
        # Every worker alike: the judge rounds weigh the consistency from this r.
        trainer.reliability_r = measurer_report(
            trainer.measurer, run.validator.crops, run.validator.feats,
            run.manifest["features"]["names"])["r"]
