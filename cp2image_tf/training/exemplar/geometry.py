"""A differentiable reading of a crop's size and shape, segmented as evaluate segments it.

The measurer reads an edit's size from its pixels and can be pleased without the size
changing (a dimmer nucleus reads as a larger one where larger nuclei are dimmer; re-measured,
the dimmer nucleus is smaller). This reading cannot: soft masks at the dataset's own
segmentation thresholds (measuring.remeasure.dataset_segmentation), smoothed as re-measurement
smooths, give each object's area and elongation (the eccentricity of its second moments), and
a per-feature slope fitted on real training crops brings them to CellProfiler's standardised
units. Why: docs/design/exemplar.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

# The soft mask's edge: sigmoid((signal - threshold) / (EDGE x threshold)).
EDGE = 0.15
# A reading is used for a feature only where it follows CellProfiler's values on real crops.
MIN_R = 0.5
SHAPE_READINGS = ("AreaShape_Area", "AreaShape_Eccentricity")
# Per channel: the object's mean intensity, named as CellProfiler names it
# ("Intensity_MeanIntensity_<image>").
INTENSITY = "Intensity_MeanIntensity_"
# The window about the centre, in typical nucleus diameters (the cell's is twice as wide).
WINDOW = 0.5


@dataclass
class Geometry:
    """What shape_readings needs: the nucleus channel, the two thresholds on the crops' scale,
    the images each channel is measured as (channel order), and per reading (object role,
    reading) the feature index and the fitted slope."""

    dna: int
    nucleus_threshold: float
    cell_threshold: float | None
    smoothing: float
    diameter: float | None
    features: list[int]
    slopes: list[float]
    parts: list[tuple[str, str]]
    channels: tuple = ()


def _blur(images, sigma: float):
    """Gaussian smoothing of [B, H, W, C] per channel (as re-measurement smooths)."""
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    channels = images.shape[-1]
    kx = np.tile(k.reshape(1, -1, 1, 1), (1, 1, channels, 1))
    ky = np.tile(k.reshape(-1, 1, 1, 1), (1, 1, channels, 1))
    images = tf.nn.depthwise_conv2d(images, kx, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(images, ky, [1, 1, 1, 1], "SAME")


def _window(h: int, w: int, sigma: float | None):
    """A Gaussian window about the crop's centre: the object under the centre counts, its
    neighbours at the crop's edges hardly (re-measurement keeps the central object only)."""
    if not sigma:
        return np.ones((1, h, w), np.float32)
    ys, xs = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    return np.exp(-(xs ** 2 + ys ** 2) / (2 * sigma ** 2)).astype(np.float32)[None]


def soft_masks(images, geometry: Geometry) -> dict:
    """{"nucleus", "cell", "cytoplasm": [B, H, W]} in [0, 1] (no cell or cytoplasm without a
    cell threshold; the cytoplasm is the cell less the nucleus),
    each weighted by a window about the centre as wide as the object (WINDOW x the typical
    nucleus diameter, twice that for the cell)."""
    images = tf.cast(images, tf.float32)
    dna = geometry.dna
    channels = images.shape[-1]
    others = [i for i in range(channels) if i != dna] or [dna]
    signal = tf.stack([images[..., dna], tf.reduce_mean(tf.gather(images, others, axis=3), 3)], 3)
    smooth = _blur(signal, geometry.smoothing)
    t = geometry.nucleus_threshold
    h, w = images.shape[1], images.shape[2]
    sigma = WINDOW * geometry.diameter if geometry.diameter else None
    nucleus = tf.sigmoid((smooth[..., 0] - t) / (EDGE * t))
    masks = {"nucleus": nucleus * _window(h, w, sigma)}
    if geometry.cell_threshold:
        c = geometry.cell_threshold
        cell = tf.maximum(tf.sigmoid((smooth[..., 1] - c) / (EDGE * c)), nucleus)
        masks["cell"] = cell * _window(h, w, 2 * sigma if sigma else None)
        masks["cytoplasm"] = tf.maximum(masks["cell"] - masks["nucleus"], 0.0)
    return masks


def _shape(mask):
    """Each soft mask's area and the eccentricity of its second moments (as an ellipse's)."""
    h, w = mask.shape[1], mask.shape[2]
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    area = tf.reduce_sum(mask, [1, 2])
    m = mask / tf.maximum(area, 1e-3)[:, None, None]
    mx, my = tf.reduce_sum(m * xs, [1, 2]), tf.reduce_sum(m * ys, [1, 2])
    dx, dy = xs[None] - mx[:, None, None], ys[None] - my[:, None, None]
    sxx, syy = tf.reduce_sum(m * dx * dx, [1, 2]), tf.reduce_sum(m * dy * dy, [1, 2])
    sxy = tf.reduce_sum(m * dx * dy, [1, 2])
    root = tf.sqrt(tf.square(sxx - syy) / 4 + tf.square(sxy) + 1e-8)
    major, minor = (sxx + syy) / 2 + root, (sxx + syy) / 2 - root
    return {"AreaShape_Area": area,
            "AreaShape_Eccentricity": tf.sqrt(tf.maximum(1.0 - minor / tf.maximum(major, 1e-6),
                                                         0.0) + 1e-8)}


def _reading(images, masks: dict, found: dict, role: str, reading: str, channels) -> tf.Tensor:
    """[B]: one (role, reading) of the images."""
    if reading.startswith(INTENSITY):
        channel = list(channels).index(reading[len(INTENSITY):])
        mask = masks[role]
        return (tf.reduce_sum(mask * images[..., channel], [1, 2])
                / tf.maximum(tf.reduce_sum(mask, [1, 2]), 1e-3))
    if role not in found:
        found[role] = _shape(masks[role])
    return found[role][reading]


def raw_readings(images, geometry: Geometry, parts=None):
    """[B, len(parts)]: each (role, reading) of the images, before the slopes."""
    images = tf.cast(images, tf.float32)
    masks, found = soft_masks(images, geometry), {}
    return tf.stack([_reading(images, masks, found, role, reading, geometry.channels)
                     for role, reading in (parts or geometry.parts)], 1)


def shape_readings(images, geometry: Geometry):
    """[B, len(geometry.features)]: the readings in CellProfiler's standardised units, up to
    an offset (compare two crops' readings, not one crop's with a profile)."""
    return raw_readings(images, geometry) * tf.constant(geometry.slopes, tf.float32)[None]


def fit_geometry(crops: np.ndarray, features: np.ndarray, names, roles: dict, segmentation,
                 channels=()) -> Geometry | None:
    """The Geometry of a dataset: `crops` [N, H, W, C] real training crops, `features` [N, F]
    their standardised profiles, `roles` object set -> role (measuring's Plan.objects),
    `segmentation` its Segmentation, `channels` the image each channel is measured as. Each
    reading whose object has the feature (e.g. Nuclei_AreaShape_Area,
    Cells_Intensity_MeanIntensity_DNA) and follows it at r >= MIN_R gets the slope of the
    feature on it. None when no reading does."""
    from cp2image_tf.measuring.remeasure import SMOOTHING

    if segmentation.nucleus_threshold is None:
        return None
    geometry = Geometry(dna=int(segmentation.dna or 0),
                        nucleus_threshold=float(segmentation.nucleus_threshold),
                        cell_threshold=(float(segmentation.cell_threshold)
                                        if segmentation.cell_threshold else None),
                        smoothing=SMOOTHING, diameter=segmentation.nucleus_diameter,
                        features=[], slopes=[], parts=[], channels=tuple(channels))
    readings = SHAPE_READINGS + tuple(INTENSITY + c for c in channels)
    candidates = [(f"{obj}_{reading}", role, reading) for obj, role in roles.items()
                  if role in ("nucleus", "cell", "cytoplasm") for reading in readings
                  if role == "nucleus" or geometry.cell_threshold
                  if role != "cytoplasm" or reading.startswith(INTENSITY)]
    candidates = [c for c in candidates if c[0] in names]
    if not candidates:
        return None
    values = np.concatenate([raw_readings(tf.constant(crops[i:i + 256], tf.float32), geometry,
                                          [(role, reading) for _, role, reading in candidates]
                                          ).numpy() for i in range(0, len(crops), 256)])
    for k, (name, role, reading) in enumerate(candidates):
        x, y = values[:, k].astype(np.float64), features[:, list(names).index(name)]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 10 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
            continue
        r = np.corrcoef(x[ok], y[ok])[0, 1]
        if r >= MIN_R:
            geometry.features.append(list(names).index(name))
            geometry.slopes.append(float(np.cov(x[ok], y[ok])[0, 1] / np.var(x[ok], ddof=1)))
            geometry.parts.append((role, reading))
    return geometry if geometry.features else None
