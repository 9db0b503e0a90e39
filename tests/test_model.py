"""The published networks: shapes, ranges, layers, schedule and losses."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cp2image_tf.training.published.losses import discriminator_loss, feature_loss, perceptual_weights, pixel_loss
from cp2image_tf.training.published.networks import (NearestResize, SubsetBatchNormalization, build_decoder,
                               build_discriminator, conv_kernels, decoder_sizes, training_decoder)


def test_published_sizes_for_68_px():
    assert decoder_sizes(68) == ([5, 14, 32, 68], [10, 28, 64])
    decoder = build_decoder(453)
    convs = [decoder.get_layer(f"block{i}_conv").output.shape[1] for i in range(1, 5)]
    assert convs == [5, 14, 32, 68]
    # 5x5x453x32 + 3 x 5x5x32x32 + 1x1x32x3 kernels, BN gamma/beta/moving stats.
    assert sum(math.prod(k.shape) for k in conv_kernels(decoder)) == 362400 + 3 * 25600 + 96
    disc = build_discriminator()
    shapes = [tuple(s[1:]) for s in disc.output_shape]
    assert shapes == [(1,), (32, 32, 32), (14, 14, 32), (5, 5, 32), (1, 1, 64)]


@pytest.mark.parametrize("size,channels,features", [(48, 1, 7), (68, 3, 453), (96, 5, 20)])
def test_shapes_and_ranges(size, channels, features):
    decoder = build_decoder(features, size, channels)
    x = np.random.default_rng(0).normal(size=(4, features)).astype("float32") * 5
    image = decoder(x, training=True).numpy()
    assert image.shape == (4, size, size, channels)
    assert image.min() >= 0.0 and image.max() <= 1.0
    raw = training_decoder(decoder)(x, training=True).numpy()
    np.testing.assert_allclose(np.clip(raw, 0, 1), image, atol=1e-6)
    assert raw.min() < 0 or raw.max() > 1  # unbounded, as published; only the output clips
    outputs = build_discriminator(size, channels)(tf.random.uniform((6, size, size, channels)))
    assert outputs[0].shape == (6, 1) and len(outputs) == 5


def test_noise_input_gives_several_cells_per_profile():
    decoder = build_decoder(10, 48, 2, noise_dim=4)
    x = np.ones((3, 10), "float32")
    a = decoder([x, np.zeros((3, 4), "float32")], training=False).numpy()
    b = decoder([x, np.ones((3, 4), "float32")], training=False).numpy()
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a[0], a[1])


def test_nearest_resize_matches_tensorflow_nearest():
    x = tf.random.uniform((2, 14, 14, 3))
    ours = NearestResize((28, 28))(x)
    theirs = tf.image.resize(x, (28, 28), method="nearest")
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    # Non-integer ratios index as TensorFlow 1's resize_nearest_neighbor (the published code).
    for source, target in ((5, 12), (13, 30), (32, 64)):
        x = tf.random.uniform((1, source, source, 2))
        expected = tf.compat.v1.image.resize_nearest_neighbor(x, (target, target), align_corners=False,
                                                              half_pixel_centers=False)
        np.testing.assert_array_equal(NearestResize((target, target))(x).numpy(), expected.numpy())


def test_nearest_resize_gradient_compiles_with_xla():
    layer = NearestResize((10, 10))
    x = tf.random.uniform((2, 5, 5, 4))

    @tf.function(jit_compile=True)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(y, x)

    # Each source pixel is copied to a 2x2 block: gradient 2 * x * 4.
    np.testing.assert_allclose(grad(x).numpy(), 8 * x.numpy(), rtol=1e-6)


def test_subset_batch_norm_uses_leading_part_only():
    layer = SubsetBatchNormalization(2 / 3, momentum=0.9, epsilon=1e-8, center=False, scale=False)
    real = np.full((2, 1, 1, 1), 1.0, "float32")
    fake = np.full((2, 1, 1, 1), 3.0, "float32")
    target = np.full((2, 1, 1, 1), 100.0, "float32")
    out = layer(np.concatenate([real, fake, target]), training=True).numpy().ravel()
    # mean 2, SD 1 from real and generated; the target is normalised with them.
    np.testing.assert_allclose(out, [-1, -1, 1, 1, 98, 98], rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [0.1 * 2.0], rtol=1e-6)


def test_published_initialiser_scale():
    decoder = build_decoder(453)
    kernel = decoder.get_layer("block1_conv").kernel.numpy()
    expected = math.sqrt(2.0 / (5 * 5 * 453 + 32))
    assert abs(kernel.std() / expected - 1) < 0.02


@pytest.mark.parametrize("step,expected", [(0, [0, 0, 0, 0]), (2500, [0, 0, 0, 0]),
                                           (3750, [0.5, 0, 0, 0]), (5000, [1, 0, 0, 0]),
                                           (8125, [1, 1, 0.25, 0]), (12500, [1, 1, 1, 1]),
                                           (680000, [1, 1, 1, 1])])
def test_schedule_weights_follow_the_published_formula(step, expected):
    np.testing.assert_allclose(perceptual_weights(step).numpy(), expected, atol=1e-6)
    for k in range(4):
        assert perceptual_weights(step)[k] == np.clip((step - 2500 * (k + 1)) / 2500, 0, 1)


def test_losses_on_known_values():
    a = tf.zeros((2, 4, 4, 3))
    b = tf.ones((2, 4, 4, 3)) * 0.5
    # 0.5 * sum of 48 x 0.25 = 6 per example; batch mean over 2 examples.
    assert float(pixel_loss(a, b, 2)) == pytest.approx(6.0)
    # Scaled by the global batch: half the batch on each of two replicas sums back.
    assert float(pixel_loss(a[:1], b[:1], 2)) * 2 == pytest.approx(6.0)
    fa, fb = tf.zeros((2, 3, 3, 8)), tf.ones((2, 3, 3, 8))
    assert float(feature_loss(fa, fb, 13872, 2)) == pytest.approx(0.5 * 13872)
    logits = tf.constant([[0.0], [0.0]])
    assert float(discriminator_loss(logits, logits, 2)) == pytest.approx(2 * math.log(2))


def test_kernels_for_weight_decay_exclude_batch_norm():
    disc = build_discriminator()
    kernels = conv_kernels(disc)
    assert len(kernels) == 5 and all(len(k.shape) == 4 for k in kernels)
    bn_vars = {id(v) for layer in disc.layers if "bn" in layer.name for v in layer.weights}
    assert not bn_vars & {id(k) for k in kernels}


def test_models_save_and_load_with_custom_layers(tmp_path):
    decoder = build_decoder(12, 48, 2)
    path = tmp_path / "decoder.keras"
    decoder.save(path)
    loaded = keras.saving.load_model(path, safe_mode=False)
    x = np.random.default_rng(1).normal(size=(3, 12)).astype("float32")
    np.testing.assert_allclose(loaded(x, training=False), decoder(x, training=False), atol=1e-6)
