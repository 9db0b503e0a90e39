"""The default model: a decoder conditioned in every block, a measurer, a projection critic.

The published decoder (model.py) sees the features once, as a 1x1 map, and its
batch norm then washes most of that conditioning out; its output is unbounded
and clipped afterwards. This model is designed for what `evaluate` measures:
that the drawn cell re-measures as the profile it was drawn from.

build_film_decoder: features [B, F] (and noise [B, N]) -> image [B, H, W, C] in (0, 1).
    An MLP embeds the features (2 x `embed` units). A dense layer maps the
    embedding to a start map of ceil(H / 4) px and w channels; three levels of two 3x3
    convolutions (widths 4w, 2w, w) with nearest-neighbour x2 upsampling between
    levels bring it to 4 ceil(H / 4) px, cropped to H. Every convolution is
    followed by batch norm without its own scale and shift and a FiLM layer whose
    scale and shift are linear in the embedding (Perez et al. 2018; conditional
    batch norm / AdaIN as in IMPA's decoder), so the profile acts in every block.
    The head is a 3x3 convolution and a sigmoid: every served pixel is a value
    the losses saw, never a clipped artefact. Any crop from 32 px.

build_measurer: crop [B, H, W, C] -> standardised features [B, F]. A small CNN
    trained on real training crops before the decoder; frozen, it scores the
    generated crops against the input profile (feature-consistency loss).

build_critic: (image, features) -> (logit [B, 1], [3 block activations]). A
    projection discriminator (Miyato and Koyama 2018): spectrally normalised
    strided convolutions, logit = w . h + <embed(features), h>, so it judges
    whether the picture is a real cell *of this profile*. Its block activations
    give the adversarially learned perceptual (feature-matching) loss of the
    published method.
"""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from cp2image_tf.training.config import MIN_CROP_SIZE
from cp2image_tf.training.model import condition_inputs

LEAK = 0.2
MIN_CROP = MIN_CROP_SIZE


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
class PixelNoise(layers.Layer):
    """x + scale_c * n, n one standard normal value per pixel, scale_c learned per channel
    (zero at the start), as StyleGAN's noise inputs.

    What the features leave open at the scale of pixels (camera noise, fine chromatin and
    filament texture) is drawn from n instead of being averaged into a blur. Training
    draws a new n every call; inference uses one fixed n (a weight, saved with the model),
    so a profile always gives the same picture and a slider moves the cell, not the noise.
    """

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, input_shape):
        import numpy as np

        height, width, channels = input_shape[1:]
        self.scale = self.add_weight(shape=(channels,), initializer="zeros", name="scale")
        fixed = np.random.default_rng(self.seed).standard_normal((1, height, width, 1))
        self.fixed = self.add_weight(shape=(1, height, width, 1), trainable=False, name="fixed",
                                     initializer=keras.initializers.Constant(fixed))

    def call(self, x, training=None):
        if training:
            noise = keras.random.normal((ops.shape(x)[0], x.shape[1], x.shape[2], 1),
                                        seed=self.seed_generator)
        else:
            noise = self.fixed
        return x + ops.cast(noise, x.dtype) * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def check_crop_size(crop_size: int) -> None:
    if crop_size < MIN_CROP:
        raise ValueError(f"crop size {crop_size} is too small for the film decoder "
                         f"(at least {MIN_CROP} px)")


def film_start_size(crop_size: int) -> int:
    """The start map's size: three levels, two x2 upsamplings, then a crop to crop_size."""
    return math.ceil(crop_size / 4)


def build_film_decoder(n_features: int, crop_size: int = 68, channels: int = 3,
                       noise_dim: int = 0, width: int = 32, embed: int = 512,
                       pixel_noise: bool = False, name: str = "decoder") -> keras.Model:
    """Features [B, F] (and noise [B, noise_dim] if noise_dim) -> image [B, H, W, C] in (0, 1)."""
    check_crop_size(crop_size)
    inputs, x = condition_inputs(n_features, noise_dim)
    e = layers.Dense(embed, name="embed1")(x)
    e = layers.LeakyReLU(LEAK, name="embed1_lrelu")(e)
    e = layers.Dense(embed, name="embed2")(e)
    e = layers.LeakyReLU(LEAK, name="embedding")(e)

    start = film_start_size(crop_size)
    widths = (4 * width, 2 * width, width)
    # A thin start map (width channels): the dense layer's size grows with the crop's area.
    x = layers.Dense(start * start * width, name="start_dense")(e)
    x = layers.Reshape((start, start, width), name="start_map")(x)
    for level, filters in enumerate(widths):
        if level:
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"level{level + 1}_up")(x)
        for conv in (1, 2):
            prefix = f"level{level + 1}_conv{conv}"
            if pixel_noise and level == len(widths) - 1:
                x = PixelNoise(seed=conv, name=f"{prefix}_noise")(x)
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
            x = layers.BatchNormalization(center=False, scale=False, momentum=0.9, synchronized=True,
                                          name=f"{prefix}_bn")(x)
            x = FiLM(filters, name=f"{prefix}_film")([x, e])
            x = layers.LeakyReLU(LEAK, name=f"{prefix}_lrelu")(x)
    excess = 4 * start - crop_size
    if excess:
        x = layers.Cropping2D(((excess // 2, excess - excess // 2),) * 2, name="crop")(x)
    # A dark start (sigmoid(-3) = 0.05): most of a crop is background.
    x = layers.Conv2D(channels, 3, padding="same", name="head_conv",
                      bias_initializer=keras.initializers.Constant(-3.0))(x)
    image = layers.Activation("sigmoid", dtype="float32", name="image")(x)
    model = keras.Model(inputs, image, name=name)
    assert tuple(model.output_shape[1:]) == (crop_size, crop_size, channels)
    return model


def _strided_features(image, widths, prefix: str, spectral: bool):
    """Strided 3x3 convolutions (stride 2) with leaky ReLU; the list of activations."""
    x, activations = image, []
    for i, filters in enumerate(widths):
        conv = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"{prefix}{i + 1}")
        x = (layers.SpectralNormalization(conv, name=f"{prefix}{i + 1}_sn")(x) if spectral
             else conv(x))
        x = layers.LeakyReLU(LEAK, name=f"{prefix}{i + 1}_lrelu")(x)
        activations.append(x)
    return activations


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


def build_measurer(n_features: int, crop_size: int = 68, channels: int = 3, width: int = 32,
                   log_view: bool = False, name: str = "measurer") -> keras.Model:
    """Crop [B, H, W, C] in [0, 1] -> the standardised CellProfiler features [B, F]."""
    image = keras.Input((crop_size, crop_size, channels), name="image")
    seen = LogView(name="log_view")(image) if log_view else image
    activations = _strided_features(seen, (width, 2 * width, 4 * width, 4 * width), "conv",
                                    spectral=False)
    x = layers.Flatten(name="flatten")(activations[-1])
    x = layers.Dense(512, name="dense")(x)
    x = layers.LeakyReLU(LEAK, name="dense_lrelu")(x)
    out = layers.Dense(n_features, name="features", dtype="float32")(x)
    return keras.Model(image, out, name=name)


def build_critic(n_features: int, crop_size: int = 68, channels: int = 3, width: int = 32,
                 log_view: bool = False, name: str = "critic") -> keras.Model:
    """(image, features) -> [logit [B, 1], block activations x 3]: a projection discriminator."""
    image = keras.Input((crop_size, crop_size, channels), name="image")
    features = keras.Input((n_features,), name="features")
    seen = LogView(name="log_view")(image) if log_view else image
    activations = _strided_features(seen, (width, 2 * width, 4 * width, 8 * width), "block",
                                    spectral=True)
    h = layers.GlobalAveragePooling2D(name="pool")(activations[-1])
    unconditional = layers.SpectralNormalization(layers.Dense(1, name="linear"),
                                                 name="linear_sn")(h)
    projection = layers.SpectralNormalization(layers.Dense(8 * width, use_bias=False,
                                                           name="embed"), name="embed_sn")(features)
    inner = layers.Dot(axes=1, name="projection")([projection, h])
    logit = layers.Add(name="logit", dtype="float32")([unconditional, inner])
    return keras.Model([image, features], [logit] + activations[:3], name=name)
