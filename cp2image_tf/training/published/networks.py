"""The CP2Image networks as Keras functional models.

build_decoder: CellProfiler features (F,) -> image (H, W, C). Four blocks of
zero-pad 4 -> 5x5 VALID convolution (32 filters, no bias) -> batch norm ->
leaky ReLU 0.01 -> nearest-neighbour resize, then a 1x1 reconstructor to C
channels -> batch norm -> leaky ReLU (Ji et al. 2024). For a 68 px crop the
sizes after each convolution are 5, 14, 32, 68 and the resizes go to 10, 28,
64, exactly as published; other crop sizes keep the same shape of network.

The published reconstructor is unbounded. This project trains on that raw
output (layer "reconstruction", as published: a clip would stop gradients for
pixels outside [0, 1]) and the model's output clips it to [0, 1] (layer
"image"), which is what generation and serving return.

build_discriminator: image -> (logit, [4 intermediate activations]). Three
blocks of 5x5 VALID convolution (32) -> batch norm -> 2x2 max-pool -> leaky
ReLU, a 5x5 VALID convolution to 64 at 1x1 -> batch norm -> leaky ReLU, and a
1x1 convolution to one logit -> batch norm. Every kernel is spectrally
normalised. Its batch norm takes training statistics from the leading
`stats_fraction` of the batch: called on [real, generated, target] it uses the
real and generated parts only, as published.

Batch norm is synchronised across replicas (a no-op on one device), so that a
global batch split over several devices or machines is normalised as it would
be on one: training does not change with the number of replicas.
"""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from cp2image_tf.training.shared.layers import condition_inputs

BN_EPSILON = 1e-8
BN_MOMENTUM = 0.9
LEAK = 0.01
FILTERS = 32


def published_normal(kernel_size: int, c_in: int, c_out: int):
    """The published initialiser: N(0, sqrt(2 / (k*k*c_in + c_out)))."""
    return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / (kernel_size ** 2 * c_in + c_out)))


@keras.saving.register_keras_serializable(package="cp2image_tf")
class NearestResize(layers.Layer):
    """Nearest-neighbour resize to a fixed size by a static gather.

    Index floor(i * in / out), as tf.image.resize(method="nearest") without half-pixel
    centres (the published code's TF 1 resize_nearest_neighbor). A gather, unlike the
    resize op, has a gradient that XLA compiles on CPU.
    """

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(int(s) for s in size)

    def call(self, inputs):
        out = inputs
        for axis, target in ((1, self.size[0]), (2, self.size[1])):
            source = inputs.shape[axis]
            index = [min(source - 1, (i * source) // target) for i in range(target)]
            out = ops.take(out, ops.convert_to_tensor(index, dtype="int32"), axis=axis)
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size[0], self.size[1], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package="cp2image_tf")
class ClipToUnit(layers.Layer):
    """Clips to [0, 1]: the served image range (training uses the unclipped input)."""

    def call(self, inputs):
        return ops.clip(inputs, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="cp2image_tf")
class SubsetBatchNormalization(layers.BatchNormalization):
    """Batch norm whose training statistics come from the leading part of the batch."""

    def __init__(self, stats_fraction: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.stats_fraction = float(stats_fraction)

    def _moments(self, inputs, mask):
        if self.stats_fraction < 1.0:
            n = ops.cast(ops.round(ops.cast(ops.shape(inputs)[0], "float32") * self.stats_fraction),
                         "int32")
            inputs = inputs[:n]
        return super()._moments(inputs, mask)

    def get_config(self):
        return {**super().get_config(), "stats_fraction": self.stats_fraction}


def decoder_sizes(crop_size: int) -> tuple[list[int], list[int]]:
    """Spatial sizes after each convolution, and the resize targets, for a crop size.

    Working back from the crop: each convolution adds 4 px (pad 4 each side, 5x5
    VALID), each resize roughly doubles. 68 gives [5, 14, 32, 68] and [10, 28, 64].
    """
    resize3 = crop_size - 4
    conv3 = round(resize3 / 2)
    resize2 = conv3 - 4
    conv2 = round(resize2 / 2)
    resize1 = conv2 - 4
    if resize1 < 5:
        raise ValueError(f"crop size {crop_size} is too small for the decoder (at least 48 px)")
    return [5, conv2, conv3, crop_size], [resize1, resize2, resize3]


def build_decoder(n_features: int, crop_size: int = 68, channels: int = 3, noise_dim: int = 0,
                  filters: int = FILTERS, name: str = "decoder") -> keras.Model:
    """Features [B, F] (and noise [B, noise_dim] if noise_dim) -> image [B, H, W, C] in [0, 1]."""
    inputs, x = condition_inputs(n_features, noise_dim)
    x = layers.Reshape((1, 1, n_features + noise_dim), name="as_1x1_map")(x)
    conv_sizes, resizes = decoder_sizes(crop_size)
    c_in = n_features + noise_dim
    for block in range(4):
        x = layers.ZeroPadding2D(4, name=f"block{block + 1}_pad")(x)
        x = layers.Conv2D(filters, 5, padding="valid", use_bias=False,
                          kernel_initializer=published_normal(5, c_in, filters),
                          name=f"block{block + 1}_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=True,
                                      name=f"block{block + 1}_bn")(x)
        x = layers.LeakyReLU(LEAK, name=f"block{block + 1}_lrelu")(x)
        if block < 3:
            x = NearestResize((resizes[block],) * 2, name=f"block{block + 1}_resize")(x)
        c_in = filters
    x = layers.Conv2D(channels, 1, use_bias=False,
                      kernel_initializer=published_normal(1, filters, channels),
                      name="reconstructor_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=True,
                                  name="reconstructor_bn")(x)
    raw = layers.LeakyReLU(LEAK, name="reconstruction")(x)
    image = ClipToUnit(name="image")(raw)
    model = keras.Model(inputs, image, name=name)
    assert tuple(model.output_shape[1:]) == (crop_size, crop_size, channels), conv_sizes
    return model


def training_decoder(decoder: keras.Model) -> keras.Model:
    """The same decoder (shared weights) returning the unclipped reconstruction for the losses."""
    return keras.Model(decoder.inputs if len(decoder.inputs) > 1 else decoder.inputs[0],
                       decoder.get_layer("reconstruction").output, name=f"{decoder.name}_raw")


def build_discriminator(crop_size: int = 68, channels: int = 3, filters: int = FILTERS,
                        stats_fraction: float = 2 / 3, name: str = "discriminator") -> keras.Model:
    """Image [B, H, W, C] -> [logit [B, 1], block1, block2, block3, block4 activations]."""
    image = keras.Input((crop_size, crop_size, channels), name="image")
    x = image
    activations = []
    c_in = channels

    def bn(layer_name):
        return SubsetBatchNormalization(stats_fraction, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                        synchronized=True, name=layer_name)

    for block in range(3):
        conv = layers.Conv2D(filters, 5, padding="valid", use_bias=False,
                             kernel_initializer=published_normal(5, c_in, filters))
        x = layers.SpectralNormalization(conv, name=f"block{block + 1}_conv")(x)
        x = bn(f"block{block + 1}_bn")(x)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
        x = layers.LeakyReLU(LEAK, name=f"block{block + 1}_lrelu")(x)
        activations.append(x)
        c_in = filters
    size = x.shape[1]
    conv = layers.Conv2D(2 * filters, size, padding="valid", use_bias=False,
                         kernel_initializer=published_normal(size, filters, 2 * filters))
    x = layers.SpectralNormalization(conv, name="block4_conv")(x)
    x = bn("block4_bn")(x)
    x = layers.LeakyReLU(LEAK, name="block4_lrelu")(x)
    activations.append(x)
    conv = layers.Conv2D(1, 1, use_bias=False, kernel_initializer=published_normal(1, 2 * filters, 1))
    x = layers.SpectralNormalization(conv, name="logit_conv")(x)
    x = bn("logit_bn")(x)
    logit = layers.Flatten(name="logit")(x)
    return keras.Model(image, [logit] + activations, name=name)


def conv_kernels(model: keras.Model) -> list:
    """Every convolution kernel variable (not batch-norm parameters): weight decay applies to these."""
    kernels = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, layers.Conv2D):
            kernels.append(layer.kernel)
    return kernels

