"""The exemplar model's bank: training cells kept in the model, looked up by profile.

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
    positions, Zernike phases). Why a bank and how large: docs/design/exemplar.md.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from cp2image_tf.tflog import without_harmless_lines
from cp2image_tf.training.shared.measurer import FEATURE_CLIP
from cp2image_tf.training.shared.symmetry import view_maps, view_order

# The bank's crops are at most this many bytes (float16): 4,837 cells of 68 x 68 x 3. The
# lookup the model starts from should be as good as the one `evaluate` compares it with
# (docs/design/exemplar.md, the bank's size).
BANK_BYTES = 128 * 2**20

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
        # The process's first float16 operation: TensorFlow's harmless line about it kept
        # from the user (tflog).
        with without_harmless_lines():
            self.crops = self.add_weight(
                shape=(self.size, self.crop_size, self.crop_size, self.channels),
                initializer="zeros", trainable=False, dtype="float16", name="crops")
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

def bank_layer(decoder) -> ExemplarBank:
    return decoder.get_layer("exemplars")


def is_exemplar_decoder(decoder) -> bool:
    """Whether a decoder is the exemplar model's (it holds a bank)."""
    return any(isinstance(layer, ExemplarBank) for layer in decoder.layers)

def fill_bank(decoder, data_dir, manifest: dict, config) -> int:
    """Fill the decoder's exemplar bank with training cells (a shuffled pass of the training
    split with the run's seed; every cell once). Returns the number of cells stored."""
    from tfrecords_tools.reader import take_cells

    layer = bank_layer(decoder)
    layer.fill(*take_cells(data_dir, manifest, "train", layer.size, seed=config.seed,
                           scaling=config.scaling, normalization=config.normalization,
                           crop_dtype=np.float16), names=manifest["features"]["names"],
               shape_weight=config.exemplar.shape_weight)
    return layer.size
