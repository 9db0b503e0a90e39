"""The exemplar model's size-and-shape reading (training/exemplar/geometry.py)."""
import numpy as np
import pytest

from cp2image_tf.measuring.remeasure import Segmentation
from cp2image_tf.training.exemplar.geometry import fit_geometry, raw_readings

SIZE = 48


def ellipse(a: float, b: float, dx: float = 0.0) -> np.ndarray:
    """A 2-channel crop: a bright DNA ellipse (semi-axes a, b) inside a dimmer cell disc, and
    a neighbour's nucleus in a corner."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2.0
    crop = np.full((SIZE, SIZE, 2), 0.02, np.float32)
    cell = np.hypot(xx, yy) < 1.6 * max(a, b)
    crop[cell, 1] = 0.4
    crop[((xx - dx) / a) ** 2 + (yy / b) ** 2 < 1, 0] = 0.8
    crop[np.hypot(xx - 21, yy - 21) < 3, 0] = 0.8
    return crop


def test_the_reading_follows_size_and_elongation_and_fits_cellprofilers_units():
    import tensorflow as tf

    axes = [(4, 4), (5, 5), (6, 6), (7, 7), (5, 3), (6, 3), (7, 3.5), (5, 4)] * 3
    crops = np.stack([ellipse(a, b, dx=k % 3 - 1) for k, (a, b) in enumerate(axes)])
    area = np.array([np.pi * a * b for a, b in axes])
    ecc = np.array([np.sqrt(1 - (min(a, b) / max(a, b)) ** 2) for a, b in axes])
    names = ["Nuclei_AreaShape_Area", "Nuclei_AreaShape_Eccentricity", "Cells_Intensity_X"]
    features = np.stack([(area - area.mean()) / area.std(), (ecc - ecc.mean()) / ecc.std(),
                         np.zeros(len(axes))], 1)
    segmentation = Segmentation(dna=0, nucleus_threshold=0.3, cell_threshold=None,
                                nucleus_diameter=12.0)
    geometry = fit_geometry(crops, features, names, {"Nuclei": "nucleus"}, segmentation)
    assert geometry.features == [0, 1]
    assert geometry.parts == [("nucleus", "AreaShape_Area"), ("nucleus", "AreaShape_Eccentricity")]
    assert all(s > 0 for s in geometry.slopes)
    readings = raw_readings(tf.constant(crops), geometry).numpy()
    assert np.corrcoef(readings[:, 0], area)[0, 1] > 0.95
    assert np.corrcoef(readings[:, 1], ecc)[0, 1] > 0.9
    # Differentiable: a brighter rim grows the reading.
    image = tf.Variable(crops[:1])
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(raw_readings(image, geometry)[:, 0])
    assert float(tf.reduce_sum(tape.gradient(total, image))) > 0


def test_no_reading_without_a_threshold_or_a_matching_feature():
    crops = np.stack([ellipse(5, 5)] * 12)
    features = np.random.default_rng(0).normal(size=(12, 1))
    segmentation = Segmentation(dna=0, nucleus_threshold=0.3, nucleus_diameter=12.0)
    assert fit_geometry(crops, features, ["Cells_Intensity_X"], {"Nuclei": "nucleus"},
                        segmentation) is None
    assert fit_geometry(crops, features, ["Nuclei_AreaShape_Area"], {"Nuclei": "nucleus"},
                        Segmentation(dna=0)) is None
    # Unrelated to the reading (r < MIN_R): not used.
    assert fit_geometry(crops, features, ["Nuclei_AreaShape_Area"], {"Nuclei": "nucleus"},
                        segmentation) is None


@pytest.mark.parametrize("moved", [0.0, 1.0])
def test_the_geometry_term_asks_the_reading_to_move_as_the_profile(moved, disc_dataset):
    import tensorflow as tf

    from cp2image_tf.training.config import FitConfig
    from cp2image_tf.training.exemplar.geometry import Geometry, shape_readings
    from cp2image_tf.training.trainer import make_trainer
    from tfrecords_tools.manifest import load_manifest

    manifest = load_manifest(disc_dataset)
    trainer = make_trainer(manifest, FitConfig(model="exemplar", steps=4, batch_size=4),
                           tf.distribute.get_strategy())
    names = manifest["features"]["names"]
    j = names.index("Nuclei_AreaShape_Area")
    trainer.geometry = Geometry(dna=0, nucleus_threshold=0.3, cell_threshold=None, smoothing=1.0,
                                diameter=12.0, features=[j], slopes=[0.01],
                                parts=[("nucleus", "AreaShape_Area")])
    small = np.stack([ellipse(5, 5)] * 4)[..., :1].repeat(manifest["crop"]["channels"], 3)
    large = np.stack([ellipse(7, 7)] * 4)[..., :1].repeat(manifest["crop"]["channels"], 3)
    small, large = small[:, 8:40, 8:40], large[:, 8:40, 8:40]  # the 32 px crops of the data
    grown = float((shape_readings(tf.constant(large), trainer.geometry)
                   - shape_readings(tf.constant(small), trainer.geometry)).numpy()[0, 0])
    asked = np.zeros((4, len(names)), np.float32)
    asked[:, j] = moved * grown
    fake = tf.constant([0.0, 1.0, 1.0, 1.0])
    term = float(trainer.geometry_term(tf.constant(large), tf.constant(small),
                                       tf.constant(asked), fake, 4.0))
    assert term == pytest.approx(3 * (grown - moved * grown) ** 2 / 4, rel=1e-4, abs=1e-6)


def test_the_intensity_reading_follows_each_objects_mean_intensity_per_channel():
    import tensorflow as tf

    rng = np.random.default_rng(3)
    crops, dna_in_nucleus, tubulin_in_cell = [], [], []
    for k in range(24):
        crop = ellipse(5 + k % 3, 5)
        bright, tubulin = rng.uniform(0.5, 1.0), rng.uniform(0.2, 0.6)
        crop[..., 0] = np.where(crop[..., 0] > 0.5, bright, crop[..., 0])
        crop[..., 1] = np.where(crop[..., 1] > 0.3, tubulin, crop[..., 1])
        crops.append(crop)
        dna_in_nucleus.append(bright)
        tubulin_in_cell.append(tubulin)
    crops = np.stack(crops)
    z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)  # noqa: E731
    names = ["Nuclei_Intensity_MeanIntensity_DNA", "Cells_Intensity_MeanIntensity_Tubulin",
             "Cytoplasm_Intensity_MeanIntensity_Tubulin", "Nuclei_Intensity_MeanIntensity_Tubulin"]
    features = np.stack([z(dna_in_nucleus), z(tubulin_in_cell), z(tubulin_in_cell),
                         rng.normal(size=24)], 1)
    segmentation = Segmentation(dna=0, nucleus_threshold=0.3, cell_threshold=0.15,
                                nucleus_diameter=12.0)
    roles = {"Nuclei": "nucleus", "Cells": "cell", "Cytoplasm": "cytoplasm"}
    geometry = fit_geometry(crops, features, names, roles, segmentation, ["DNA", "Tubulin"])
    # The nucleus's tubulin is a constant 0.02 here: unrelated to its (random) feature.
    assert geometry.parts == [("nucleus", "Intensity_MeanIntensity_DNA"),
                              ("cell", "Intensity_MeanIntensity_Tubulin"),
                              ("cytoplasm", "Intensity_MeanIntensity_Tubulin")]
    assert geometry.features == [0, 1, 2]
    readings = raw_readings(tf.constant(crops), geometry).numpy()
    assert np.corrcoef(readings[:, 0], dna_in_nucleus)[0, 1] > 0.95
    assert np.corrcoef(readings[:, 2], tubulin_in_cell)[0, 1] > 0.95
    # Without channels, no intensity reading (nor any other here): None.
    assert fit_geometry(crops, features, names, roles, segmentation) is None
