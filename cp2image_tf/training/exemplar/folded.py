"""The exemplar decoder's inference graph with its weights folded, for serving.

At batch 1 on a CPU the exemplar model's time goes mostly to the number of graph ops, not to
arithmetic: the Keras graph runs batch norm, FiLM and the bank lookup as some 400 small ops.
make_folded builds the same image from the same weights in fewer ops, the folding that
deployment tool chains do:

- Batch norm (moving statistics, no scale or shift of its own) folds into the convolution
  before it: W' = W / sqrt(var + eps), b' = -mean / sqrt(var + eps).
- FiLM's scale and shift are linear in the embedding e, and so is b' carried through them:
  lrelu((conv(x, W') + b') (1 + gamma(e)) + beta(e)) = lrelu(conv(x, W') S + T) with
  S = 1 + e Kg + bg and T = e (Kb + Kg b') + bb + b' (1 + bg). The S and T of every block
  come from one matrix product of the embedding. For one cell (a batch of 1, as the explore
  page asks), S folds into the kernel and T is its bias: lrelu(conv(x, W' S) + T), which
  oneDNN runs as one fused op.
- The embedding's first layer reads [z, clip(z) - the exemplar's profile]: its product is
  z's with one kernel (the two parts' summed) less a row of a table of every bank cell's
  profile (in each view) through the kernel, computed once here; z's clipped part is
  added only when some feature is beyond the clip. Half the layer's weights read at a call.
- The bank lookup gathers the four views' permuted queries in one gather, and shows the
  picked crop in its view with one gather of its pixels (a table of each view's pixel
  order), instead of turning it all four ways.
- The lookup reads less of the bank: the exact one reads all its features at every call
  (598 x 4,837 float32, 11.6 MB at a full bank of the sample's shape). The profiles are first
  compared in the bank's first PROJECTION principal axes, then the CANDIDATES nearest there
  are measured exactly in all features; the nearest of those is the cell drawn.
- With the warp (FitConfig's exemplar.warp), the exemplar is warped by
  tf.raw_ops.ImageProjectiveTransformV3, which samples as exemplar.WarpCrop does, in one op.
- The decoder blocks convolve [x upsampled x2, skip]: the sum of the two parts' convolutions,
  the upsampled part's a stride-2 transposed convolution of x itself (upsampling_kernel), so
  no upsampled map is made and the upsampled part costs 16 taps at a quarter of the pixels
  instead of 9 at all of them (where the upsampled map is cropped, it is made, by one resize).

The bank's crops, norms and view tables are the decoder's own variables; the folded weights
(and the bank's features, cell-major) are new variables of this module, so a SavedModel
holding it restores in TensorFlow Serving as any other. tests/test_exemplar.py checks that it
draws what the Keras decoder draws.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from cp2image_tf.training.exemplar.bank import FEATURE_CLIP
from cp2image_tf.training.exemplar.networks import LOGIT_EPS, exemplar_parts, warp_transforms
from cp2image_tf.training.shared.layers import LEAK
from cp2image_tf.training.shared.symmetry import view_order

# The lookup's prefilter (make_folded): principal axes kept, candidates measured exactly; how
# these were chosen (every test cell drawn as the exact lookup draws it): docs/design/serving.md.
PROJECTION = 64
CANDIDATES = 32
BLOCKS = ("enc1", "enc2", "enc3", "mid1", "mid2", "dec2", "dec1")
UPSAMPLED = ("dec2", "dec1")  # blocks whose input is [x upsampled x2, skip connection]


def _np(variable) -> np.ndarray:
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable, np.float64)


def fold_block(decoder, name: str):
    """(W' [3, 3, in, out], the scale's kernel and bias [E, c], [c], the shift's [E, c], [c],
    strides) of one conv-batch-norm-FiLM block, folded as the module docstring says."""
    conv, bn, film = decoder.get_layer(name), decoder.get_layer(f"{name}_bn"), \
        decoder.get_layer(f"{name}_film")
    if conv.use_bias or bn.center or bn.scale:
        raise ValueError(f"{name}: a block with a bias or batch-norm scale does not fold")
    inv = 1.0 / np.sqrt(_np(bn.moving_variance) + bn.epsilon)
    kernel = _np(conv.kernel) * inv
    shift0 = -_np(bn.moving_mean) * inv
    kg, bg = _np(film.gamma.kernel), _np(film.gamma.bias)
    kb, bb = _np(film.beta.kernel), _np(film.beta.bias)
    return (kernel, kg, 1.0 + bg, kb + kg * shift0[None, :], bb + shift0 * (1.0 + bg),
            conv.strides[0])


def upsampling_kernel(kernel: np.ndarray) -> np.ndarray:
    """A 3 x 3 kernel [3, 3, in, out] applied to an input upsampled x2 (nearest), as the
    4 x 4 kernel [4, 4, out, in] of a stride-2 transposed convolution of the input itself.
    Along each axis, output pixel 2i + d reads input pixels i - 1, i, i + 1 with weights
    that sum the taps falling on the same input pixel: (k2, k1 + k2, k0 + k1, k0) over
    d - 2i = -1, 0, 1, 2 (zero padding of the upsampled input is zero padding of the input
    when the upsampled size is twice the input's)."""
    def along(k, axis):
        k0, k1, k2 = (np.take(k, i, axis=axis) for i in range(3))
        return np.stack([k2, k1 + k2, k0 + k1, k0], axis=axis)

    return np.transpose(along(along(kernel, 0), 1), (0, 1, 3, 2))


def f32(value, name):
    return tf.Variable(np.asarray(value, np.float32), trainable=False, name=name)


def fold_embedding(module, parts, noise_dim: int) -> np.ndarray:
    """The embedding's weights on `module`; returns Kd, the first layer's kernel of the
    profile difference.

    The embedding's first layer reads [z, noise, clip(z) - the exemplar's profile p]:
    z Kz + noise Kn + (clip(z) - p) Kd = z (Kz + Kd) + noise Kn - p Kd, plus (clip(z) - z) Kd
    where z is clipped. p Kd is a row of a table of the bank's cells in each view (fold_bank)."""
    n_features = parts.bank.n_features
    kernel1 = _np(parts.embed1.kernel)
    kd = kernel1[n_features + noise_dim:]
    module.embed1_kernel = f32(kernel1[:n_features] + kd, "embed1_kernel")
    module.embed1_clipped = f32(kd, "embed1_clipped")
    module.embed1_noise = f32(kernel1[n_features:n_features + noise_dim], "embed1_noise")
    module.embed1_bias = f32(_np(parts.embed1.bias), "embed1_bias")
    module.embed2_kernel = f32(_np(parts.embed2.kernel), "embed2_kernel")
    module.embed2_bias = f32(_np(parts.embed2.bias), "embed2_bias")
    if parts.warp is not None:
        module.warp_kernel = f32(_np(parts.warp.kernel), "warp_kernel")
        module.warp_bias = f32(_np(parts.warp.bias), "warp_bias")
    module.delta_kernel = f32(_np(parts.delta.kernel), "delta_kernel")
    module.delta_bias = f32(_np(parts.delta.bias), "delta_bias")
    return kd


def fold_blocks(module, decoder):
    """The U-Net's blocks folded (fold_block) onto `module`: (kernels, FiLM sizes, strides).
    An upsampled block's kernel is (the upsampled input's kernel, as a transposed one where
    the upsampled map is not cropped; the skip connection's kernel; whether it is)."""
    kernels, film_kernels, film_biases, sizes, strides = [], [], [], [], []
    for name in BLOCKS:
        kernel, ks, bs, kt, bt, stride = fold_block(decoder, name)
        if name in UPSAMPLED:
            below = decoder.get_layer(f"{name}_up").input.shape
            exact = tuple(decoder.get_layer(name).input.shape[1:3]) == (2 * below[1], 2 * below[2])
            up = kernel[:, :, :below[-1]]
            kernels.append((f32(upsampling_kernel(up) if exact else up, f"{name}_up_kernel"),
                            f32(kernel[:, :, below[-1]:], f"{name}_skip_kernel"), exact))
        else:
            kernels.append(f32(kernel, f"{name}_kernel"))
        film_kernels += [ks, kt]
        film_biases += [bs, bt]
        sizes += [kernel.shape[-1]] * 2
        strides.append(stride)
    module.kernels = [v for k in kernels for v in (k[:2] if isinstance(k, tuple) else (k,))]
    module.film_kernel = f32(np.concatenate(film_kernels, axis=1), "film_kernel")
    module.film_bias = f32(np.concatenate(film_biases), "film_bias")
    return kernels, sizes, strides


def fold_bank(module, bank, kd: np.ndarray) -> None:
    """The bank's lookup tables on `module`: each view's pixel order, the prefilter's
    projection, and every bank cell's profile (in each view) through Kd."""
    views, size, n_features, side = bank.views, bank.size, bank.n_features, bank.crop_size
    if views > 1:
        # pixel_order[v] lists, for each pixel of view v, the crop's pixel it shows (row-major).
        grid = np.arange(side * side).reshape(side, side)
        orders = []
        for k, mirror in view_order()[:views]:
            turned = np.rot90(grid, k)
            orders.append((turned[:, ::-1] if mirror else turned).reshape(-1))
        module.pixel_order = tf.Variable(np.stack(orders).astype(np.int32), trainable=False,
                                         name="pixel_order")
    # The lookup's prefilter: the bank projected on its first PROJECTION principal axes
    # (uncentred: they keep inner products), where the CANDIDATES nearest are found, then
    # measured exactly.
    module.projection = module.projected = module.cells = None
    cells = _np(bank.features).T  # [size, F]
    if PROJECTION * 2 <= n_features and size * views > 4 * CANDIDATES:
        _, vectors = np.linalg.eigh(cells.T @ cells)
        axes = vectors[:, ::-1][:, :PROJECTION]
        module.projection = f32(axes, "projection")
        module.projected = f32((cells @ axes).T, "projected")
        # The bank's features cell-major too: candidates' rows gather contiguously.
        module.cells = f32(cells, "cells")
    # Each bank cell's profile, as each view has it, through the embedding: row view x size +
    # cell (the index nearest() returns).
    sources = (np.asarray(bank.view_sources.numpy()) if views > 1
               else np.arange(n_features)[None, :])
    module.embed1_bank = f32(np.concatenate([cells[:, source] @ kd for source in sources]),
                             "embed1_bank")


def lookup_fn(module, bank):
    """lookup(f): (crop [B, H, W, C] of the bank cell nearest f as its view shows it, the
    index of that view and cell), through the tables of fold_bank."""
    views, size, n_features = bank.views, bank.size, bank.n_features
    side, channels = bank.crop_size, bank.channels
    norms = bank.norms if views == 1 else bank.view_norms

    def nearest(queries):
        """The index (view x size + cell) of the nearest bank cell to queries [B, views, F]."""
        flat = tf.reshape(queries, [-1, n_features])
        if module.projection is None:
            cross = tf.reshape(tf.matmul(flat, bank.features), [-1, views * size])
            return tf.argmin(norms[None, :] - 2.0 * cross, axis=1, output_type=tf.int32)
        cross = tf.matmul(tf.matmul(flat, module.projection), module.projected)
        _, candidates = tf.math.top_k(2.0 * tf.reshape(cross, [-1, views * size]) - norms[None, :],
                                      k=CANDIDATES)
        found = tf.gather(module.cells, tf.math.floormod(candidates, size))  # [B, m, F]
        asked = tf.gather(queries, tf.math.floordiv(candidates, size), batch_dims=1)
        exact = tf.gather(norms, candidates) - 2.0 * tf.reduce_sum(asked * found, axis=2)
        best = tf.argmin(exact, axis=1, output_type=tf.int32)
        return tf.gather(candidates, best, batch_dims=1)

    def lookup(f):
        if views == 1:
            cell = nearest(f[:, None, :])
            return tf.cast(tf.gather(bank.crops, cell), tf.float32), cell
        masked = f * bank.view_mask[None, :]
        sources = tf.reshape(bank.view_sources, [-1])
        index = nearest(tf.reshape(tf.gather(masked, sources, axis=1), [-1, views, n_features]))
        cell, view = tf.math.floormod(index, size), tf.math.floordiv(index, size)
        # The crop as the view shows it: its pixels gathered in the view's order.
        pixels = tf.reshape(tf.gather(bank.crops, cell), [-1, side * side, channels])
        crops = tf.reshape(tf.gather(pixels, tf.gather(module.pixel_order, view), batch_dims=1),
                           [-1, side, side, channels])
        return tf.cast(crops, tf.float32), index

    return lookup


def block(x, kernel, scale, shift, stride, one):
    if one:
        # One cell: its FiLM scale folded into the kernel, the shift a bias (a convolution
        # with bias and activation: one fused op on oneDNN).
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel * scale[0, 0, 0], stride, "SAME"),
                           shift[0, 0, 0])
    else:
        y = tf.nn.conv2d(x, kernel, stride, "SAME") * scale + shift
    return tf.nn.leaky_relu(y, LEAK)

def up_block(x, skip, kernel, scale, shift, stride, one):
    """A decoder block on [x upsampled x2, skip]: the convolution of the concatenation is
    the sum of its two parts', and the upsampled part's is a stride-2 transposed
    convolution of x (upsampling_kernel): 16 taps at a quarter of the pixels, not 9 at
    all of them, and no upsampled map. When the upsampled map is cropped (an odd skip
    size), the crop's edge is not zero padding of x: there x is upsampled as drawn."""
    up, across, exact = kernel
    if one:
        up = up * (scale[0, 0, 0][:, None] if exact else scale[0, 0, 0])
        across = across * scale[0, 0, 0]
    h, w = skip.shape[1], skip.shape[2]
    if exact:
        size = tf.stack([tf.shape(x)[0], h, w, up.shape[2]])
        y = tf.nn.conv2d_transpose(x, up, size, 2, "SAME")
    else:
        y = tf.image.resize(x, [2 * x.shape[1], 2 * x.shape[2]], method="nearest")
        y = tf.nn.conv2d(y[:, :h, :w, :], up, 1, "SAME")
    if one:
        # conv + bias + add + activation: one fused op on oneDNN.
        return tf.nn.leaky_relu(
            tf.nn.bias_add(tf.nn.conv2d(skip, across, 1, "SAME"), shift[0, 0, 0]) + y, LEAK)
    return tf.nn.leaky_relu((tf.nn.conv2d(skip, across, 1, "SAME") + y) * scale + shift, LEAK)

def convolutions(exemplar, films, one, kernels, strides):
    """The editor's U-Net: the correction's last feature map."""
    k = iter(zip(kernels, films[0::2], films[1::2], strides))
    s1 = block(exemplar, *next(k), one)
    s2 = block(s1, *next(k), one)
    x = block(s2, *next(k), one)
    x = block(x, *next(k), one)
    x = block(x, *next(k), one)
    x = up_block(x, s2, *next(k), one)
    return up_block(x, s1, *next(k), one)


def draw_fn(module, parts, lookup, kernels, sizes, strides, noise_dim: int):
    """draw(z, like=None, noise=None): the folded decoder's image (make_folded)."""
    side, warp = parts.bank.crop_size, parts.warp is not None

    def draw(z, like=None, noise=None):
        z = tf.cast(z, tf.float32)
        asked = tf.clip_by_value(z, -FEATURE_CLIP, FEATURE_CLIP)
        f = asked if like is None else tf.clip_by_value(tf.cast(like, tf.float32),
                                                        -FEATURE_CLIP, FEATURE_CLIP)
        exemplar, index = lookup(f)
        e = tf.matmul(z, module.embed1_kernel) + (module.embed1_bias
                                                 - tf.gather(module.embed1_bank, index))
        if noise_dim and noise is not None:
            e += tf.matmul(tf.cast(noise, tf.float32), module.embed1_noise)
        # Features beyond the clip (rare: FEATURE_CLIP SD) enter the difference clipped.
        e = tf.cond(tf.reduce_any(tf.not_equal(asked, z)),
                    lambda: e + tf.matmul(asked - z, module.embed1_clipped), lambda: e)
        e = tf.nn.leaky_relu(e, LEAK)
        e = tf.nn.leaky_relu(tf.matmul(e, module.embed2_kernel) + module.embed2_bias, LEAK)
        if warp:
            # The exemplar warped as WarpCrop warps it, by the one op that samples so.
            exemplar = tf.raw_ops.ImageProjectiveTransformV3(
                images=exemplar, output_shape=[side, side], fill_value=0.0,
                transforms=warp_transforms(tf.matmul(e, module.warp_kernel) + module.warp_bias,
                                           side, side),
                interpolation="BILINEAR", fill_mode="NEAREST")
        films = tf.split(tf.reshape(tf.matmul(e, module.film_kernel) + module.film_bias,
                                    [-1, 1, 1, sum(sizes)]), sizes, axis=3)
        x = tf.cond(tf.shape(z)[0] == 1,
                    lambda: convolutions(exemplar, films, True, kernels, strides),
                    lambda: convolutions(exemplar, films, False, kernels, strides))
        d = tf.nn.bias_add(tf.nn.conv2d(x, module.delta_kernel, 1, "SAME"), module.delta_bias)
        floor = tf.reduce_min(exemplar, axis=[1, 2], keepdims=True)
        span = tf.maximum(1.0 - floor, LOGIT_EPS)
        u = tf.clip_by_value((exemplar - floor) / span, LOGIT_EPS, 1.0 - LOGIT_EPS)
        return floor + span * tf.sigmoid(tf.math.log(u / (1.0 - u)) + d)

    return draw


def make_folded(decoder):
    """A tf.Module whose draw(z, like=None, noise=None) draws what the exemplar `decoder` draws
    for standardised features z [B, F], edited from the bank cell nearest `like` (default z);
    noise [B, N] (zeros if None) when the decoder takes noise. The one function serving
    (serving/export.py) folds the exemplar model with."""
    parts = exemplar_parts(decoder)
    noise_dim = sum(int(i.shape[-1]) for i in decoder.inputs if i.name.startswith("noise"))
    module = tf.Module(name="folded_exemplar")
    kd = fold_embedding(module, parts, noise_dim)
    kernels, sizes, strides = fold_blocks(module, decoder)
    fold_bank(module, parts.bank, kd)
    module.draw = draw_fn(module, parts, lookup_fn(module, parts.bank), kernels, sizes, strides,
                          noise_dim)
    return module
