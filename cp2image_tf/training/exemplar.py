"""The exemplar model: the nearest real training cell, edited towards the asked profile.

A decoder that draws a cell from nothing must invent everything the features leave open
(where the cell sits, its outline's wiggles, chromatin and filament texture); trained
against one paired crop per profile, it draws the average of those possibilities: a blur.
The nearest training cell by profile, the lookup `evaluate` compares models with, has none
of that problem but cannot move with the features.

This model does both (retrieval-conditioned generation, as instance-conditioned GANs and
IMPA's image-to-image transfer of a cell to a condition):

ExemplarBank: a layer holding `bank` training cells (their clipped standardised features
    and their crops in float16), filled once from the training split before training
    starts and saved with the weights, so the SavedModel serves it as it is. It returns
    the bank cell nearest the asked profile (Euclidean, clipped standardised features).
    In training it excludes the cell itself (a distance of zero) and picks one of the
    `top_k` nearest, so the editor learns to move a neighbour to a profile.
    With views, each bank cell is also offered turned a quarter and mirrored (symmetry.py),
    with its profile as the view has it: CellProfiler's texture is measured along four
    directions, which a quarter turn or a mirror image permutes, so a cell whose texture
    runs the other way than the asked profile's is found turned to match. (A half turn
    leaves every direction where it was: it reads as the same profile, so it is not
    offered.) The distance then leaves out the features no view can say (orientation,
    positions, Zernike phases).

build_exemplar_networks: features [B, F] -> image [B, H, W, C] in (0, 1). An MLP embeds
    the asked profile and its difference to the exemplar's. A small U-Net reads the
    exemplar crop (H, H/2, H/4); every convolution is followed by batch norm without its
    own scale and shift and a FiLM layer of the embedding. The head adds a correction
    to the exemplar's logits above its background floor (EditAboveFloor): image = f +
    (1 - f) sigmoid(logit((exemplar - f) / (1 - f)) + delta), f each channel's darkest
    exemplar pixel. The head starts at zero, so a new model draws the exemplar exactly;
    every pixel is bounded and seen by the losses, and none is darker than the image's
    background (on the sample data, whose background is one camera offset, edits without
    the floor put single pixels below it: the cells' DNA minimum 5-14 SD below real cells').

Training (film_trainer.py) needs no pixel loss to the paired crop, which would pull the
edit towards the blurred average: the measurer's reading of the edit must move from its
reading of the exemplar by the asked profile's difference (relative feature consistency),
the projection critic keeps the picture a real cell of that profile, an L1 anchor on the
correction keeps the edit to what the profile asks for, and a share of each batch edits the
cell itself towards its own profile, where the correction should be none.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from cp2image_tf.training.film import LEAK, FiLM, check_crop_size
from cp2image_tf.training.model import condition_inputs
from cp2image_tf.training.symmetry import view_maps, view_order

FEATURE_CLIP = 5.0
# The bank's crops are at most this many bytes (float16): 4,837 cells of 68 x 68 x 3. The lookup
# the model starts from should be as good as the one `evaluate` compares it with: on BBBC013 the
# nearest of 2,048 training cells re-measured 0.81 of the features at r >= 0.7, of all 4,068 0.86.
BANK_BYTES = 128 * 2**20
LOGIT_EPS = 1e-3


def clip_features(x):
    """Standardised features as float32 clipped to +-FEATURE_CLIP, as the bank stores them."""
    return ops.clip(ops.cast(x, "float32"), -FEATURE_CLIP, FEATURE_CLIP)


def bank_size(wanted: int, crop_size: int, channels: int, training_cells: int | None = None) -> int:
    """The number of exemplars kept: `wanted`, or fewer to stay within BANK_BYTES and the
    training split."""
    size = min(wanted, BANK_BYTES // (crop_size * crop_size * channels * 2))
    if training_cells:
        size = min(size, training_cells)
    return int(max(1, size))


def shape_features(names) -> np.ndarray:
    """Which features describe an object's shape and size (AreaShape, not Zernike moments):
    what an edit changes least, so the lookup may weigh them more (ExemplarBank.fill)."""
    return np.array(["_AreaShape_" in n and "_Zernike_" not in n for n in names], bool)


@keras.saving.register_keras_serializable(package="cp2image_tf")
class ExemplarBank(layers.Layer):
    """features [B, F] -> (the nearest bank cell's crop [B, H, W, C], its features [B, F],
    the asked features clipped as the bank's [B, F])."""

    def __init__(self, size: int, n_features: int, crop_size: int, channels: int,
                 top_k: int = 4, seed: int = 0, views: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.size, self.n_features = int(size), int(n_features)
        self.crop_size, self.channels = int(crop_size), int(channels)
        self.top_k, self.seed = int(max(1, min(top_k, size))), int(seed)
        # 1: the cells as they are; 4: a quarter turn or not, mirrored or not (the first four
        # of symmetry.view_order: the views whose profiles differ).
        if views not in (1, 4):
            raise ValueError(f"views must be 1 or 4, not {views}")
        self.views = int(views)
        # Named: the same checkpoint entry in every process (an automatic name is uniquified).
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="exemplar_picks")

    def build(self, input_shape):
        # Stored feature-major with each cell's squared norm: the lookup of one profile is
        # then one matrix-vector product over the bank, the cost of serving one cell.
        self.features = self.add_weight(shape=(self.n_features, self.size), initializer="zeros",
                                        trainable=False, name="features")
        self.norms = self.add_weight(shape=(self.size,), initializer="zeros", trainable=False,
                                     name="norms")
        self.crops = self.add_weight(shape=(self.size, self.crop_size, self.crop_size, self.channels),
                                     initializer="zeros", trainable=False, dtype="float16",
                                     name="crops")
        self.filled = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                      name="filled")
        if self.views > 1:
            # View v's profile of a cell is its features[sources[v]] (symmetry.view_maps); the
            # distance counts the features every view knows (mask), with each view's norms.
            self.view_sources = self.add_weight(shape=(self.views, self.n_features),
                                                initializer="zeros", trainable=False,
                                                dtype="int32", name="view_sources")
            self.view_mask = self.add_weight(shape=(self.n_features,), initializer="zeros",
                                             trainable=False, name="view_mask")
            self.view_norms = self.add_weight(shape=(self.views * self.size,),
                                              initializer="zeros", trainable=False,
                                              name="view_norms")

    def fill(self, features: np.ndarray, crops: np.ndarray, names=None,
             shape_weight: float = 1.0) -> None:
        """Store `size` training cells (standardised features, crops in [0, 1]); with views,
        `names` are the features' names (their texture directions), and the lookup's distance
        counts each shape feature (shape_features) `shape_weight` times."""
        if shape_weight != 1.0 and self.views == 1:
            raise ValueError("a shape weight needs a bank with views (exemplar_views)")
        if len(features) < self.size:
            raise ValueError(f"the bank holds {self.size} cells; {len(features)} given")
        kept = np.clip(features[:self.size], -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
        self.features.assign(np.ascontiguousarray(kept.T))
        self.norms.assign((kept * kept).sum(axis=1))
        self.crops.assign(np.asarray(crops[:self.size], np.float16))
        if self.views > 1:
            if names is None or len(names) != self.n_features:
                raise ValueError("a bank with views needs the features' names")
            sources, weights = view_maps(names)
            sources, weights = sources[:self.views], weights[:self.views]
            mask = weights.prod(axis=0).astype(np.float32)
            mask[shape_features(names)] *= shape_weight
            self.view_sources.assign(sources.astype(np.int32))
            self.view_mask.assign(mask)
            self.view_norms.assign(np.concatenate(
                [(kept[:, source] ** 2 * mask).sum(axis=1) for source in sources]))
        self.filled.assign(1.0)

    def bank_features(self, index=None):
        """The bank's features, cell-major [size, F] (or of the cells `index` [B, F])."""
        features = self.features if index is None else ops.take(self.features, index, axis=1)
        return ops.transpose(ops.cast(features, "float32"))

    def call(self, inputs, training=None):
        """inputs: the asked features, or [asked features, the profile whose nearest cell to
        edit] (a pinned exemplar)."""
        features, like = (inputs if isinstance(inputs, (list, tuple)) else (inputs, inputs))
        asked, f = clip_features(features), clip_features(like)
        if self.views > 1:
            return self._call_views(asked, f, training)
        # |f - b|^2 less |f|^2, which is the same for every bank cell b.
        distance = self.norms[None, :] - 2.0 * ops.matmul(f, self.features)
        if training:
            # Not the cell itself, and one of the top_k nearest: a neighbour to edit. The
            # expanded distance of a cell to itself is float32 rounding of the norms (up to
            # ~1e-3 for 600 features), so "itself" is relative to them.
            own = ops.sum(f * f, axis=1, keepdims=True)
            itself = distance + own < 1e-5 * (own + self.norms[None, :]) + 1e-6
            distance = ops.where(itself, ops.full_like(distance, 1e9), distance)
            _, nearest = ops.top_k(-distance, k=self.top_k)
            pick = keras.random.randint((ops.shape(f)[0], 1), 0, self.top_k,
                                        seed=self.seed_generator)
            index = ops.take_along_axis(nearest, pick, axis=1)[:, 0]
        else:
            index = ops.argmin(distance, axis=1)
        crops = ops.cast(ops.take(self.crops, index, axis=0), "float32")
        return crops, self.bank_features(index), asked

    def _call_views(self, asked, f, training):
        """call() over every cell's views: index v * size + cell."""
        n, views = self.size, self.views
        masked = f * self.view_mask[None, :]
        # sum_j m_j (f_j - b_{s(j)})^2 less sum_j m_j f_j^2. A view's map s permutes texture
        # directions by an involution (a turn and a mirror commute, each its own inverse), so
        # sum_j m_j f_j b_{s(j)} = sum_i (m f)_{s(i)} b_i: the query permuted, one product.
        permuted = ops.stack([ops.take(masked, self.view_sources[v], axis=1)
                              for v in range(views)], axis=1)  # [B, V, F]
        batch = ops.shape(f)[0]
        cross = ops.matmul(ops.reshape(permuted, (-1, self.n_features)), self.features)
        distance = self.view_norms[None, :] - 2.0 * ops.reshape(cross, (batch, views * n))
        if training:
            own = ops.sum(f * f, axis=1, keepdims=True)
            plain = self.norms[None, :] - 2.0 * ops.matmul(f, self.features)
            itself = plain + own < 1e-5 * (own + self.norms[None, :]) + 1e-6
            distance = ops.where(ops.tile(itself, (1, views)), ops.full_like(distance, 1e9),
                                 distance)
            _, nearest = ops.top_k(-distance, k=self.top_k)
            pick = keras.random.randint((batch, 1), 0, self.top_k, seed=self.seed_generator)
            index = ops.take_along_axis(nearest, pick, axis=1)[:, 0]
        else:
            index = ops.argmin(distance, axis=1)
        index = ops.cast(index, "int32")
        cell, view = index % n, index // n
        crops = ops.cast(ops.take(self.crops, cell, axis=0), "float32")
        turned = []
        for k, mirror in view_order()[:views]:
            t = ops.rot90(crops, k=k, axes=(1, 2)) if k else crops
            turned.append(ops.flip(t, axis=2) if mirror else t)
        one_hot = ops.one_hot(view, views, dtype="float32")  # [B, V]
        crops = ops.einsum("bv,bvhwc->bhwc", one_hot, ops.stack(turned, axis=1))
        profile = ops.take_along_axis(self.bank_features(cell),
                                      ops.take(self.view_sources, view, axis=0), axis=1)
        return crops, profile, asked

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        return ((input_shape[0], self.crop_size, self.crop_size, self.channels),
                (input_shape[0], self.n_features), (input_shape[0], self.n_features))

    def get_config(self):
        return {**super().get_config(), "size": self.size, "n_features": self.n_features,
                "crop_size": self.crop_size, "channels": self.channels, "top_k": self.top_k,
                "seed": self.seed, "views": self.views}


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
    move; benchmarks/bench_edits.py)."""

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
    `edit` signature draws the same through the folded graph (serving/folded.py); this
    Keras model is its definition (the tests compare the two)."""
    n_features = decoder.get_layer("exemplars").n_features
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
    """Whether the exemplar decoder warps its exemplar (FitConfig.exemplar_warp)."""
    return any(layer.name == "warp" for layer in decoder.layers)


def bank_layer(decoder) -> ExemplarBank:
    return decoder.get_layer("exemplars")


def fill_bank(decoder, data_dir, manifest: dict, config) -> int:
    """Fill the decoder's exemplar bank with training cells (a shuffled pass of the training
    split with the run's seed; every cell once). Returns the number of cells stored."""
    from tfrecords_tools.reader import take_cells

    layer = bank_layer(decoder)
    layer.fill(*take_cells(data_dir, manifest, "train", layer.size, seed=config.seed,
                           scaling=config.scaling, normalization=config.normalization,
                           crop_dtype=np.float16), names=manifest["features"]["names"],
               shape_weight=config.exemplar_shape_weight)
    return layer.size
