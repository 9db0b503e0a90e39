"""The published CP2Image losses and the delayed schedule of the perceptual terms.

Per-example losses are summed and divided by the *global* batch size, so that
gradients summed over replicas equal the single-device gradient.
"""
from __future__ import annotations

import tensorflow as tf


def perceptual_weights(step, n_layers: int = 4, delay: float = 2500.0, slope: float = 2500.0):
    """Weight of feature term k at step t: clip((t - delay * (k + 1)) / slope, 0, 1).

    Early training is driven by pixels, later by the discriminator's features.
    """
    step = tf.cast(step, tf.float32)
    k = tf.range(n_layers, dtype=tf.float32)
    return tf.clip_by_value((step - delay * (k + 1.0)) / slope, 0.0, 1.0)


def pixel_loss(generated, target, global_batch: int):
    """0.5 x sum over (y, x, c) of the squared error, mean over the global batch."""
    per_example = 0.5 * tf.reduce_sum(tf.square(generated - target), axis=[1, 2, 3])
    return tf.reduce_sum(per_example) / global_batch


def feature_loss(generated_features, target_features, image_size: int, global_batch: int):
    """0.5 x image_size x mean over (h, w, c) of the squared feature difference, mean over
    the global batch (image_size = H*W*C rescales each term to the input's size)."""
    diff = tf.square(generated_features - target_features)
    per_example = 0.5 * image_size * tf.reduce_mean(diff, axis=list(range(1, diff.shape.rank)))
    return tf.reduce_sum(per_example) / global_batch


def discriminator_loss(real_logits, fake_logits, global_batch: int):
    """Sigmoid cross-entropy: the independent real batch labelled 1, generated cells 0."""
    real = tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(real_logits), real_logits)
    fake = tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(fake_logits), fake_logits)
    return (tf.reduce_sum(real) + tf.reduce_sum(fake)) / global_batch
