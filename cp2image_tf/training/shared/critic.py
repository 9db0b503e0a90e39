"""The critic the film and exemplar models train against: a projection discriminator."""
from __future__ import annotations

import keras
from keras import layers

from cp2image_tf.training.shared.layers import LEAK, LogView, strided_features

def build_critic(n_features: int, crop_size: int = 68, channels: int = 3, width: int = 32,
                 log_view: bool = False, name: str = "critic") -> keras.Model:
    """(image, features) -> [logit [B, 1], block activations x 3]: a projection discriminator."""
    image = keras.Input((crop_size, crop_size, channels), name="image")
    features = keras.Input((n_features,), name="features")
    seen = LogView(name="log_view")(image) if log_view else image
    activations = strided_features(seen, (width, 2 * width, 4 * width, 8 * width), "block",
                                    spectral=True)
    h = layers.GlobalAveragePooling2D(name="pool")(activations[-1])
    unconditional = layers.SpectralNormalization(layers.Dense(1, name="linear"),
                                                 name="linear_sn")(h)
    projection = layers.SpectralNormalization(layers.Dense(8 * width, use_bias=False,
                                                           name="embed"), name="embed_sn")(features)
    inner = layers.Dot(axes=1, name="projection")([projection, h])
    logit = layers.Add(name="logit", dtype="float32")([unconditional, inner])
    return keras.Model([image, features], [logit] + activations[:3], name=name)
