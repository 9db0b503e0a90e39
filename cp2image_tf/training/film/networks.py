"""The film decoder: a profile drawn from nothing by a network conditioned in every block.

A documented baseline kept in the product (`--model film`): the exemplar model is the
default; docs/design/film.md says why it replaced this one and what the film decoder is still
good for (a model without a bank of training cells).

The published decoder (published/networks.py) sees the features once, as a 1x1 map, and its
batch norm then washes most of that conditioning out. This one is designed for what
`evaluate` measures: that the drawn cell re-measures as the profile it was drawn from.

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

It trains against the shared measurer and critic (shared/measurer.py, shared/critic.py) with
a pixel loss to the paired crop (film/trainer.py).
"""
from __future__ import annotations

import math

import keras
from keras import layers

from cp2image_tf.training.shared.layers import LEAK, FiLM, check_crop_size, condition_inputs

def film_start_size(crop_size: int) -> int:
    """The start map's size: three levels, two x2 upsamplings, then a crop to crop_size."""
    return math.ceil(crop_size / 4)


def build_film_decoder(n_features: int, crop_size: int = 68, channels: int = 3,
                       noise_dim: int = 0, width: int = 32, embed: int = 512,
                       name: str = "decoder") -> keras.Model:
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
