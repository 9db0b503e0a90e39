"""Counters kept in a run's checkpoint: steps, planned steps and training seconds."""
from __future__ import annotations


def counter(name: str, dtype: str = "int64", value=0):
    """A non-trainable variable that every replica shares (the first replica's value wins).

    The trainers keep their step counters in these, and the training seconds that
    --time-limit sums over the runs of one RUN_DIR.
    """
    import tensorflow as tf

    return tf.Variable(value, dtype=dtype, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
