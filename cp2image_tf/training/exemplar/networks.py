"""The exemplar model (the default): the nearest real training cell, edited towards the
asked profile.

A decoder that draws a cell from nothing must invent everything the features leave open
(where the cell sits, its outline's wiggles, chromatin and filament texture); trained
against one paired crop per profile, it draws the average of those possibilities: a blur.
The nearest training cell by profile, the lookup `evaluate` compares models with, has none
of that problem but cannot move with the features. This model does both
(retrieval-conditioned generation, as instance-conditioned GANs and IMPA's image-to-image
transfer of a cell to a condition); docs/design/exemplar.md gives the reasons and their
measurements.

The bank (bank.py) gives the exemplar. build_exemplar_networks: features [B, F] -> image
[B, H, W, C] in (0, 1). An MLP embeds the asked profile and its difference to the
exemplar's. With the warp the exemplar is first warped about its centre (WarpCrop). A small
U-Net reads the exemplar crop (H, H/2, H/4); every convolution is followed by batch norm
without its own scale and shift and a FiLM layer of the embedding. The head adds a
correction to the exemplar's logits above its background floor (EditAboveFloor): image =
f + (1 - f) sigmoid(logit((exemplar - f) / (1 - f)) + delta), f each channel's darkest
exemplar pixel. The head starts at zero, so a new model draws the exemplar exactly; every
pixel is bounded and seen by the losses, and none is darker than the image's background.

Training (trainer.py) needs no pixel loss to the paired crop; serving runs the same graph
with its weights folded (folded.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

from cp2image_tf.training.exemplar.bank import ExemplarBank, bank_layer, bank_size, clip_features
from cp2image_tf.training.shared.layers import LEAK, FiLM, check_crop_size, condition_inputs

LOGIT_EPS = 1e-3

@keras.saving.register_keras_serializable(package="cp2image_tf")
class EditAboveFloor(layers.Layer):
    """[exemplar crop in [0, 1], logit correction] -> the edited crop, each channel kept above
    the exemplar's darkest pixel in it (the image's background floor: camera offset and
    background; no object is darker): with f that floor, u = (exemplar - f) / (1 - f)
    clipped to [eps, 1 - eps], image = f + (1 - f) x sigmoid(logit(u) + delta). A zero
    correction gives the exemplar back (its darkest pixel within eps of the floor)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        exemplar, delta = (ops.cast(x, "float32") for x in inputs)
        floor = ops.min(exemplar, axis=(1, 2), keepdims=True)
        span = ops.maximum(1.0 - floor, LOGIT_EPS)
        u = ops.clip((exemplar - floor) / span, LOGIT_EPS, 1.0 - LOGIT_EPS)
        return floor + span * ops.sigmoid(ops.log(u) - ops.log(1.0 - u) + delta)

# The warp's sampling matrix is I + WARP_LIMIT x tanh(raw) (symmetric): each axis drawn from
# between 2/3 and 2 times its length in the exemplar.
WARP_LIMIT = 0.5

def warp_transforms(params, height: int, width: int):
    """The [B, 8] projective transforms (tf.raw_ops.ImageProjectiveTransformV3's: output pixel
    (x, y) reads input ((a0 x + a1 y + a2), (b0 x + b1 y + b2))) of the warp's raw parameters
    [B, 3]: a symmetric linear map about the crop's centre, I + WARP_LIMIT x tanh(params) as
    [[1 + p0, p1], [p1, 1 + p2]] in (x, y)."""
    p = WARP_LIMIT * ops.tanh(ops.cast(params, "float32"))
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    zero = ops.zeros_like(a)
    return ops.stack([1.0 + a, b, -a * cx - b * cy, b, 1.0 + c, -b * cx - c * cy, zero, zero],
                     axis=1)

@keras.saving.register_keras_serializable(package="cp2image_tf")
class WarpCrop(layers.Layer):
    """[crop [B, H, W, C], raw warp parameters [B, 3]] -> the crop warped about its centre
    (warp_transforms), sampled bilinearly with the edge pixels extended: the same values as
    tf.raw_ops.ImageProjectiveTransformV3 (BILINEAR, fill mode NEAREST), which serving runs,
    but differentiable in the parameters (that op has no gradient for its transforms). Zero
    parameters give the crop back exactly: an edit can grow, shrink or stretch its exemplar's
    cell, which the pixel correction alone cannot (it draws strokes where a border should
    move; docs/design/exemplar.md)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        crop, params = inputs
        crop = ops.cast(crop, "float32")
        h, w, channels = crop.shape[1], crop.shape[2], crop.shape[3]
        t = warp_transforms(params, h, w)
        ys, xs = np.meshgrid(np.arange(h, dtype="float32"), np.arange(w, dtype="float32"),
                             indexing="ij")
        xs, ys = ops.convert_to_tensor(xs)[None], ops.convert_to_tensor(ys)[None]
        k = [ops.reshape(t[:, i], (-1, 1, 1)) for i in range(6)]
        x = k[0] * xs + k[1] * ys + k[2]
        y = k[3] * xs + k[4] * ys + k[5]
        x, y = ops.clip(x, 0.0, w - 1.0), ops.clip(y, 0.0, h - 1.0)
        x0, y0 = ops.floor(x), ops.floor(y)
        wx, wy = (x - x0)[..., None], (y - y0)[..., None]
        x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
        x1, y1 = ops.minimum(x0 + 1, w - 1), ops.minimum(y0 + 1, h - 1)
        flat = ops.reshape(crop, (-1, h * w, channels))

        def at(yi, xi):
            index = ops.reshape(yi * w + xi, (-1, h * w, 1))
            return ops.reshape(ops.take_along_axis(flat, index, axis=1), (-1, h, w, channels))

        top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
        bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
        return top * (1.0 - wy) + bottom * wy

    def compute_output_shape(self, input_shape):
        return input_shape[0]

def _conv_film(make, x, e, filters: int, name: str, strides: int = 1):
    x = make(name, lambda: layers.Conv2D(filters, 3, strides=strides, padding="same",
                                         use_bias=False, name=name))(x)
    x = make(f"{name}_bn", lambda: layers.BatchNormalization(
        center=False, scale=False, momentum=0.9, synchronized=True, name=f"{name}_bn"))(x)
    x = make(f"{name}_film", lambda: FiLM(filters, name=f"{name}_film"))([x, e])
    return make(f"{name}_lrelu", lambda: layers.LeakyReLU(LEAK, name=f"{name}_lrelu"))(x)

def _up_to(make, x, skip, name: str):
    """x upsampled x2 and cropped to the skip connection's size."""
    x = make(f"{name}_up", lambda: layers.UpSampling2D(2, interpolation="nearest",
                                                       name=f"{name}_up"))(x)
    excess = x.shape[1] - skip.shape[1]
    if excess:
        x = make(f"{name}_crop", lambda: layers.Cropping2D(((0, excess), (0, excess)),
                                                           name=f"{name}_crop"))(x)
    return make(f"{name}_skip", lambda: layers.Concatenate(name=f"{name}_skip"))([x, skip])

@keras.saving.register_keras_serializable(package="cp2image_tf")
class ClipFeatures(layers.Layer):
    """clip_features as a layer (the editor's graph clips the asked profile with it)."""

    def call(self, x):
        return clip_features(x)

def _pick(make, inputs, like):
    """The bank cell nearest `like` (None: the features): (its crop, its features, the
    asked features clipped)."""
    features = inputs[0] if isinstance(inputs, list) else inputs
    return make("exemplars", None)(features if like is None else [features, like])

def _edit_graph(make, condition, picked, channels: int, width: int, embed: int,
                warp: bool = False):
    """The editor's graph on Keras tensors; `make(name, constructor)` gives each layer (new, or
    an existing model's). `picked`: (exemplar crop, its features, the asked features clipped).
    With `warp`, the exemplar is first warped (WarpCrop) by a map the embedding sets.
    Returns (image, the logit correction)."""
    exemplar, exemplar_features, clipped = picked
    difference = make("difference", lambda: layers.Subtract(name="difference"))(
        [clipped, exemplar_features])
    e = make("asked", lambda: layers.Concatenate(name="asked"))([condition, difference])
    e = make("embed1", lambda: layers.Dense(embed, name="embed1"))(e)
    e = make("embed1_lrelu", lambda: layers.LeakyReLU(LEAK, name="embed1_lrelu"))(e)
    e = make("embed2", lambda: layers.Dense(embed, name="embed2"))(e)
    e = make("embedding", lambda: layers.LeakyReLU(LEAK, name="embedding"))(e)

    if warp:
        params = make("warp", lambda: layers.Dense(3, kernel_initializer="zeros",
                                                   bias_initializer="zeros", name="warp"))(e)
        exemplar = make("warped", lambda: WarpCrop(name="warped"))([exemplar, params])
    w = width
    s1 = _conv_film(make, exemplar, e, w, "enc1")
    s2 = _conv_film(make, s1, e, 2 * w, "enc2", strides=2)
    x = _conv_film(make, s2, e, 4 * w, "enc3", strides=2)
    x = _conv_film(make, x, e, 4 * w, "mid1")
    x = _conv_film(make, x, e, 4 * w, "mid2")
    x = _conv_film(make, _up_to(make, x, s2, "dec2"), e, 2 * w, "dec2")
    x = _conv_film(make, _up_to(make, x, s1, "dec1"), e, w, "dec1")
    delta = make("delta", lambda: layers.Conv2D(channels, 3, padding="same",
                                                kernel_initializer="zeros",
                                                bias_initializer="zeros", name="delta"))(x)
    image = make("image", lambda: EditAboveFloor(name="image"))([exemplar, delta])
    return image, delta

def build_exemplar_networks(n_features: int, crop_size: int = 68, channels: int = 3,
                            noise_dim: int = 0, width: int = 16, embed: int = 256,
                            bank: int = 8192, top_k: int = 4, seed: int = 0,
                            training_cells: int | None = None, views: bool = False,
                            warp: bool = False, name: str = "decoder"):
    """(decoder: features -> image, editor: [features, (noise,) exemplar crop, exemplar
    features] -> [image, the logit correction]); the two share every layer but the bank
    (training picks exemplars with the bank and runs the editor). views: the bank offers its
    cells turned a quarter and mirrored too (ExemplarBank). warp: the editor first warps its
    exemplar (WarpCrop)."""
    check_crop_size(crop_size)
    made = {"exemplars": ExemplarBank(bank_size(bank, crop_size, channels, training_cells),
                                      n_features, crop_size, channels, top_k=top_k, seed=seed,
                                      views=4 if views else 1, name="exemplars")}

    def make(layer_name, constructor):
        if layer_name not in made:
            made[layer_name] = constructor()
        return made[layer_name]

    inputs, condition = condition_inputs(n_features, noise_dim)
    image, _ = _edit_graph(make, condition, _pick(make, inputs, None), channels, width, embed,
                           warp)
    decoder = keras.Model(inputs, image, name=name)
    # The editor takes its exemplar as inputs: training picks it with the bank, or, for the
    # identity share of a batch, gives the cell itself.
    e_inputs, e_condition = condition_inputs(n_features, noise_dim)
    e_features = e_inputs[0] if isinstance(e_inputs, list) else e_inputs
    exemplar = keras.Input((crop_size, crop_size, channels), name="exemplar")
    exemplar_features = keras.Input((n_features,), name="exemplar_features")
    clipped = make("clip_features", lambda: ClipFeatures(name="clip_features"))(e_features)
    e_image, delta = _edit_graph(make, e_condition, (exemplar, exemplar_features, clipped),
                                 channels, width, embed, warp)
    editor = keras.Model([*(e_inputs if isinstance(e_inputs, list) else [e_inputs]), exemplar,
                          exemplar_features], [e_image, delta], name=f"{name}_editor")
    assert tuple(decoder.output_shape[1:]) == (crop_size, crop_size, channels)
    return decoder, editor

def pinned_decoder(decoder) -> keras.Model:
    """(features [B, F], like [B, F]) -> image: the features drawn as an edit of the bank cell
    nearest `like` (standardised features both), with the decoder's own layers and weights.

    A traversal pins its start profile's exemplar this way, so the strip shows one cell
    changing with the feature rather than the lookup jumping between cells. The served
    `edit` signature draws the same through the folded graph (folded.py); this
    Keras model is its definition (the tests compare the two)."""
    n_features = bank_layer(decoder).n_features
    noise = [i for i in decoder.inputs if i.name.startswith("noise")]
    channels = decoder.output_shape[-1]
    inputs, condition = condition_inputs(n_features, noise[0].shape[-1] if noise else 0)
    like = keras.Input((n_features,), name="like")
    width = decoder.get_layer("enc1").filters
    embed = decoder.get_layer("embed1").units
    make = lambda name, _: decoder.get_layer(name)  # noqa: E731
    image, _ = _edit_graph(make, condition, _pick(make, inputs, like), channels, width, embed,
                           has_warp(decoder))
    return keras.Model([*(inputs if isinstance(inputs, list) else [inputs]), like], image,
                       name=f"{decoder.name}_pinned")

def has_warp(decoder) -> bool:
    """Whether the exemplar decoder warps its exemplar (FitConfig's exemplar.warp)."""
    return any(layer.name == "warp" for layer in decoder.layers)


@dataclass(frozen=True)
class ExemplarParts:
    """The layers of an exemplar decoder that its folded graph (folded.py) reads directly:
    the bank, the embedding's two dense layers, the warp's (None without) and the head."""

    bank: ExemplarBank
    embed1: layers.Dense
    embed2: layers.Dense
    warp: layers.Dense | None
    delta: layers.Conv2D


def exemplar_parts(decoder) -> ExemplarParts:
    """The ExemplarParts of a decoder built by build_exemplar_networks (the names it gives)."""
    return ExemplarParts(bank=bank_layer(decoder), embed1=decoder.get_layer("embed1"),
                         embed2=decoder.get_layer("embed2"),
                         warp=decoder.get_layer("warp") if has_warp(decoder) else None,
                         delta=decoder.get_layer("delta"))
