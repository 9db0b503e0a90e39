"""Telling treatments (or mechanisms) apart from re-measured features: a logistic regression
trained on real training cells, scored on real, generated and baseline pictures alike."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from cp2image_tf.metrics import finite_mean, half_of_each



def _fit_classifier(features: pd.DataFrame, labels, seed: int):
    model = LogisticRegression(max_iter=2000, random_state=seed)
    return model.fit(np.nan_to_num(features.to_numpy(np.float64)), np.asarray(labels))


def classify(train: pd.DataFrame, train_labels, standardized: dict, labels, seed: int,
             unseen_halves: bool = False) -> tuple[dict, dict]:
    """A logistic regression trained on re-measured real training cells, scored on the real
    test cells (the ceiling), the generated ones and the baselines.

    Test cells whose label the training cells lack are unseen. With `unseen_halves`, a second
    classifier also learns a random half of each unseen label's real test cells and is scored
    on the other half, for every method alike. Returns the summary and, per method, 1/0 per
    test cell for a right/wrong prediction (NaN where not scored)."""
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError("a classifier needs at least 2 classes among the training cells")
    columns = list(train.columns)
    labels = np.asarray(labels)
    seen = np.isin(labels, classes)
    frames = {name: frame[columns] for name, frame in standardized.items()}
    correct = {name: np.full(len(labels), np.nan) for name in frames}
    model = _fit_classifier(train, train_labels, seed)
    for name, frame in frames.items():
        if seen.any():
            correct[name][seen] = model.predict(
                np.nan_to_num(frame[seen].to_numpy(np.float64))) == labels[seen]
    unseen = sorted(set(labels[~seen]))
    summary = {"accuracy": {name: finite_mean(c[seen]) for name, c in correct.items()},
               "chance": 1.0 / len(classes), "cells": int(seen.sum()), "train_cells": len(train),
               "features": len(columns), "classes": classes, "unseen": unseen}
    if unseen and unseen_halves:
        learn = half_of_each(labels, unseen, np.random.default_rng(seed + 5))
        scored = ~seen & ~learn
        extended = _fit_classifier(pd.concat([train, frames["ceiling"][learn]]),
                                   list(train_labels) + list(labels[learn]), seed)
        for name, frame in frames.items():
            if scored.any():
                correct[name][scored] = extended.predict(
                    np.nan_to_num(frame[scored].to_numpy(np.float64))) == labels[scored]
        summary["unseen_accuracy"] = {name: finite_mean(c[scored]) for name, c in correct.items()}
        summary["unseen_protocol"] = {
            "learned_cells": int(learn.sum()), "scored_cells": int(scored.sum()),
            "chance": 1.0 / (len(classes) + len(unseen)),
            "how": "a second classifier learns the training cells plus a random half of each "
                   "unseen treatment's real test cells; scored on the other half"}
    return summary, correct
