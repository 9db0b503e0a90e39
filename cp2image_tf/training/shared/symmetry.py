"""The measurer's training views: a crop turned or mirrored is the same cell, and its profile
is known.

CellProfiler's measurements of a cell do not depend on how the cell lies, with exceptions
that are known by name: the Haralick texture features are measured along four directions
(mahotas' offsets, index 0 horizontal, 1 diagonal, 2 vertical, 3 anti-diagonal), which a
quarter turn or a mirror image permutes; orientation, positions and Zernike phases change
in ways a permutation cannot say. So each of the eight turns and mirror images of a
training crop comes with the profile permuted for its texture directions and with those
other features left out of the loss (a weight of 0).

A measurer trained on the eight views reads more of the validation features than one trained
on the crops as they are, which over-fits, or on half-turns only
(docs/design/measurer-and-judge.md).
"""
from __future__ import annotations

import numpy as np

# Mahotas' direction indices: 0 (0, 1) horizontal, 1 (1, 1), 2 (1, 0) vertical, 3 (1, -1).
QUARTER_TURN = {0: 2, 1: 3, 2: 0, 3: 1}
MIRROR = {0: 0, 1: 3, 2: 2, 3: 1}
# Features no turn or mirror image leaves alone and no permutation repairs.
CHANGING = ("Orientation", "Location_", "Center_", "BoundingBoxMinimum", "BoundingBoxMaximum",
            "ZernikePhase", "Angle")
# ... of which these are unchanged by a half turn (an axis' angle is modulo 180 degrees).
HALF_TURN_SAFE = ("Orientation",)


def texture_direction(name: str) -> tuple[int, int] | None:
    """(position of the direction token, direction 0-3) of a Texture feature's name, or None.

    CellProfiler 3 and later: ..._Texture_<measure>_<image>_<scale>_<direction 00-03>_<levels>;
    CellProfiler 2: ..._Texture_<measure>_<image>_<scale>_<direction 0-3>."""
    parts = name.split("_")
    if "Texture" not in parts or len(parts) < 4:
        return None
    if parts[-2] in ("00", "01", "02", "03") and parts[-1].isdigit() and parts[-3].isdigit():
        return len(parts) - 2, int(parts[-2])
    if parts[-1] in ("0", "1", "2", "3") and parts[-2].isdigit():
        return len(parts) - 1, int(parts[-1])
    return None


def _moved(name: str, position: int, direction: int) -> str:
    parts = name.split("_")
    parts[position] = f"{direction:0{len(parts[position])}d}"
    return "_".join(parts)


def view_order(square: bool = True) -> list[tuple[int, int]]:
    """The views as (k quarter turns, then a left-right mirror if m): k = 0..3, m = 0, 1;
    k odd only for square crops."""
    return [(k, mirror) for k in range(4) if square or not k % 2 for mirror in (0, 1)]


def view_maps(names, square: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For the views of view_order(square): (sources [V, F] int, weights [V, F]).

    The profile of view v is features[sources[v]]; weights[v] is 0 where it is unknown."""
    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    sources, weights = [], []
    for k, mirror in view_order(square):
        source = np.arange(len(names))
        weight = np.ones(len(names), np.float32)
        sources.append(source)
        weights.append(weight)
        if k == 0 and not mirror:
            continue
        for i, name in enumerate(names):
            if any(c in name for c in CHANGING):
                if not (k == 2 and not mirror and any(c in name for c in HALF_TURN_SAFE)):
                    weight[i] = 0.0
                continue
            found = texture_direction(name)
            if found is None:
                continue
            position, original = found
            # The view's direction was the original's before the transform (both maps are
            # their own inverses): undo the mirror, then the k quarter turns.
            if mirror:
                original = MIRROR[original]
            for _ in range(k):
                original = QUARTER_TURN[original]
            partner = index.get(_moved(name, position, original))
            if partner is None:
                weight[i] = 0.0
            else:
                source[i] = partner
    return np.stack(sources), np.stack(weights)


def random_views(images, features, sources, weights, seed):
    """Each example as a random one of the views: (images, features, weights), with a
    stateless `seed` [2] (the same seed, the same views)."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    count = sources.shape[0]
    pick = tf.random.stateless_uniform([n], seed, 0, count, tf.int32)
    views = []
    for k, mirror in view_order(square=count == 8):
        turned = tf.image.rot90(images, k)
        views.append(tf.image.flip_left_right(turned) if mirror else turned)
    images = tf.gather_nd(tf.stack(views, 1), tf.stack([tf.range(n), pick], 1))
    features = tf.gather(features, tf.gather(sources, pick), batch_dims=1)
    return images, features, tf.gather(weights, pick)
