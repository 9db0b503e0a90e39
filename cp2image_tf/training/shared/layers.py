"""Layers the film and exemplar networks share: the decoder's condition inputs, FiLM
conditioning, the log view the measurer and critic see, and the strided feature stacks
they are built from."""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from cp2image_tf.training.config import MIN_CROP_SIZE

LEAK = 0.2


def condition_inputs(n_features: int, noise_dim: int = 0):
    """The decoder's inputs (features, and noise when noise_dim) and the condition they make:
    (the Keras input or list of inputs, the condition tensor)."""
    features = keras.Input((n_features,), name="features")
    if not noise_dim:
        return features, features
    noise = keras.Input((noise_dim,), name="noise")
    return [features, noise], layers.Concatenate(name="condition")([features, noise])


def check_crop_size(crop_size: int) -> None:
    """A ValueError for a crop smaller than the film and exemplar networks draw."""
    if crop_size < MIN_CROP_SIZE:
        raise ValueError(f"crop size {crop_size} is too small for this decoder "
                         f"(at least {MIN_CROP_SIZE} px)")


@keras.saving.register_keras_serializable(package="cp2image_tf")
class FiLM(layers.Layer):
    """x * (1 + gamma(e)) + beta(e), gamma and beta linear in the embedding e.

    Zero-initialised, so a new decoder starts as an unconditioned network and
    learns how much each channel follows the profile.
    """

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.gamma = layers.Dense(self.channels, kernel_initializer="zeros", name="gamma")
        self.beta = layers.Dense(self.channels, kernel_initializer="zeros", name="beta")

    def build(self, input_shape):
        self.gamma.build(input_shape[1])
        self.beta.build(input_shape[1])

    def call(self, inputs):
        x, embedding = inputs
        gamma = ops.expand_dims(ops.expand_dims(self.gamma(embedding), 1), 1)
        beta = ops.expand_dims(ops.expand_dims(self.beta(embedding), 1), 1)
        return x * (1.0 + ops.cast(gamma, x.dtype)) + ops.cast(beta, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="cp2image_tf")
class LogView(layers.Layer):
    """x -> [x, (log(x + eps) - log(eps)) / -log(eps)]: the image and its log, both about [0, 1].

    CellProfiler measures dim levels too (a cell's minimum, median and MAD intensity, its
    edge's): a lift of the background from 0.001 to 0.003 is several standard deviations
    of such features, and invisible on a linear scale. The log view shows it to the
    measurer and the critic.
    """

    EPS = 1e-3

    def call(self, x):
        log = (ops.log(ops.maximum(x, 0.0) + self.EPS) - math.log(self.EPS)) / -math.log(self.EPS)
        return ops.concatenate([x, log], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2 * input_shape[-1])


def strided_features(image, widths, prefix: str, spectral: bool):
    """Strided 3x3 convolutions (stride 2) with leaky ReLU; the list of activations."""
    x, activations = image, []
    for i, filters in enumerate(widths):
        conv = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"{prefix}{i + 1}")
        x = (layers.SpectralNormalization(conv, name=f"{prefix}{i + 1}_sn")(x) if spectral
             else conv(x))
        x = layers.LeakyReLU(LEAK, name=f"{prefix}{i + 1}_lrelu")(x)
        activations.append(x)
    return activations
