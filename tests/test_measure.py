"""cp2image_tf.measuring.measure: values on drawn objects, CellProfiler's names, cp-measure's values."""
import re
import warnings

import numpy as np
import pytest
from cp_measure.core.measuregranularity import get_granularity
from cp_measure.core.measureobjectintensitydistribution import get_radial_distribution

from cp2image_tf.measuring import measure
from tfrecords_tools.errors import UserInputError


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def two_object_field(seed=0, size=96):
    """A round nucleus and an ellipse, each inside its cell; textured, two channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size), np.int32)
    nuclei[disc((size, size), 30, 28, 9)] = 1
    nuclei[((yy - 64) / 7.0) ** 2 + ((xx - 62) / 12.0) ** 2 <= 1] = 2
    cells = np.zeros_like(nuclei)
    cells[disc((size, size), 30, 28, 18)] = 1
    cells[disc((size, size), 64, 64, 22) & (cells == 0)] = 2
    dna = np.where(nuclei > 0, 0.4 + 0.2 * rng.random((size, size)), 0.02)
    tubulin = np.where(cells > 0, 0.1 + 0.3 * rng.random((size, size)), 0.01)
    return {"DNA": dna, "Tubulin": tubulin}, {"Nuclei": nuclei, "Cells": cells}


def test_disc_area_centre_and_intensity():
    shape, cy, cx, r = (101, 121), 50, 40, 20
    mask = disc(shape, cy, cx, r).astype(np.int32)
    dna = np.where(mask > 0, 0.5, 0.05)
    tubulin = np.where(mask > 0, 0.25, 0.0)
    table = measure.measure_objects({"DNA": dna, "Tubulin": tubulin}, {"Nuclei": mask},
                                    ["sizeshape", "intensity"])["Nuclei"]
    assert len(table) == 1
    row = table.iloc[0]
    assert row["ObjectNumber"] == 1
    assert row["AreaShape_Area"] == pytest.approx(np.pi * r * r, rel=0.01)
    assert row["AreaShape_Area"] == mask.sum()
    assert (row["Location_Center_X"], row["Location_Center_Y"]) == (cx, cy)
    assert (row["AreaShape_Center_X"], row["AreaShape_Center_Y"]) == (cx, cy)
    assert row["AreaShape_Eccentricity"] < 0.05
    assert row["AreaShape_FormFactor"] == pytest.approx(1.0, abs=0.15)
    assert row["Intensity_MeanIntensity_DNA"] == pytest.approx(0.5)
    assert row["Intensity_IntegratedIntensity_DNA"] == pytest.approx(0.5 * mask.sum())
    assert row["Intensity_MeanIntensity_Tubulin"] == pytest.approx(0.25)
    assert row["Intensity_MaxIntensity_DNA"] == pytest.approx(0.5)


def test_labels_are_object_numbers_and_x_is_the_column():
    mask = np.zeros((60, 80), np.int32)
    mask[10:20, 50:70] = 7   # x 50..69, y 10..19
    mask[40:50, 5:15] = 3
    table = measure.measure_objects({"DNA": np.full(mask.shape, 0.2)}, {"Nuclei": mask},
                                    ["sizeshape"])["Nuclei"]
    assert table["ObjectNumber"].tolist() == [3, 7]
    assert table["Location_Center_X"].tolist() == [9.5, 59.5]
    assert table["Location_Center_Y"].tolist() == [44.5, 14.5]
    assert table["AreaShape_Area"].tolist() == [100, 200]


def test_empty_object_set_gives_an_empty_table():
    images = {"DNA": np.zeros((32, 32))}
    tables = measure.measure_objects(images, {"Nuclei": np.zeros((32, 32), np.int32)})
    assert len(tables["Nuclei"]) == 0
    assert list(tables["Nuclei"].columns) == ["ObjectNumber"]


CP_PATTERNS = [
    r"ObjectNumber", r"Location_Center_[XY]",
    r"AreaShape_[A-Za-z]+(_[XY])?", r"AreaShape_Zernike_\d_\d",
    r"AreaShape_(Spatial|Central|Normalized)Moment_\d_\d", r"AreaShape_HuMoment_\d",
    r"AreaShape_InertiaTensor_\d_\d", r"AreaShape_InertiaTensorEigenvalues_\d",
    r"Intensity_[A-Za-z]+Intensity(Edge)?_(DNA|Tubulin)",
    r"Intensity_MassDisplacement_(DNA|Tubulin)",
    r"Location_(CenterMassIntensity|MaxIntensity)_[XYZ]_(DNA|Tubulin)",
    r"Texture_[A-Za-z]+[12]?_(DNA|Tubulin)_3_0[0-3]_256",
    r"Granularity_([1-9]|1[0-6])_(DNA|Tubulin)",
    r"RadialDistribution_(FracAtD|MeanFrac|RadialCV)_(DNA|Tubulin)_[1-4]of4",
    r"RadialDistribution_Zernike(Magnitude|Phase)_(DNA|Tubulin)_\d_\d",
    r"Correlation_(Correlation|Slope|Overlap)_DNA_Tubulin",
    r"Correlation_(K|Manders|RWC|Costes)_(DNA_Tubulin|Tubulin_DNA)",
]


def test_every_column_is_named_as_cellprofiler_names_it():
    images, masks = two_object_field()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Costes on tiny objects
        tables = measure.measure_objects(images, masks, "all")
    assert list(tables) == ["Nuclei", "Cells"]
    columns = list(tables["Cells"].columns)
    assert columns == list(tables["Nuclei"].columns)
    assert columns[:3] == ["ObjectNumber", "Location_Center_X", "Location_Center_Y"]
    assert len(columns) == len(set(columns))
    unmatched = [c for c in columns if not any(re.fullmatch(p, c) for p in CP_PATTERNS)]
    assert unmatched == []
    for name in ["AreaShape_Area", "AreaShape_Eccentricity", "AreaShape_Zernike_2_0",
                 "AreaShape_MaxFeretDiameter", "AreaShape_HuMoment_0",
                 "Intensity_MeanIntensity_DNA", "Intensity_IntegratedIntensity_Tubulin",
                 "Intensity_LowerQuartileIntensity_DNA", "Location_CenterMassIntensity_X_DNA",
                 "Texture_Contrast_DNA_3_00_256", "Texture_InfoMeas2_Tubulin_3_03_256",
                 "Granularity_1_DNA", "Granularity_16_Tubulin",
                 "RadialDistribution_FracAtD_DNA_1of4", "RadialDistribution_RadialCV_Tubulin_4of4",
                 "RadialDistribution_ZernikeMagnitude_DNA_0_0",
                 "Correlation_Correlation_DNA_Tubulin", "Correlation_Slope_DNA_Tubulin",
                 "Correlation_Manders_DNA_Tubulin", "Correlation_Manders_Tubulin_DNA",
                 "Correlation_K_Tubulin_DNA", "Correlation_RWC_DNA_Tubulin",
                 "Correlation_Costes_Tubulin_DNA", "Correlation_Overlap_DNA_Tubulin"]:
        assert name in columns, name
    assert sum(c.startswith("Texture_") for c in columns) == 13 * 4 * 2
    assert "Correlation_Correlation_Tubulin_DNA" not in columns  # one order, as CellProfiler


def test_default_modules_give_the_required_families_and_nothing_slow():
    images, masks = two_object_field()
    columns = set(measure.measure_objects(images, masks)["Nuclei"].columns)
    for name in ["AreaShape_Area", "AreaShape_Zernike_9_9", "Intensity_MeanIntensity_DNA",
                 "Texture_Contrast_Tubulin_3_02_256", "Granularity_4_DNA",
                 "RadialDistribution_MeanFrac_DNA_2of4"]:
        assert name in columns, name
    assert not any(c.startswith(("Correlation_", "Granularity_5_", "AreaShape_HuMoment",
                                 "RadialDistribution_Zernike")) for c in columns)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # cp-measure's empty wedges
def test_granularity_and_radial_distribution_equal_cp_measure():
    images, masks = two_object_field(seed=3, size=120)
    for name, labels in masks.items():
        for ch, pixels in images.items():
            ours = measure.granularity({ch: pixels}, {name: labels}, 16)[name]
            theirs = get_granularity(labels, pixels)
            assert list(ours) == [f"{key}_{ch}" for key in theirs]
            for key in theirs:
                np.testing.assert_allclose(ours[f"{key}_{ch}"], theirs[key], rtol=1e-9,
                                           atol=1e-12)
            ours = measure._radial_features(measure._radial_geometry(labels, 4), pixels)
            theirs = get_radial_distribution(labels, pixels)
            assert list(ours) == list(theirs)
            for key in theirs:
                np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9, atol=1e-12)


def test_granularity4_is_the_start_of_the_full_spectrum():
    images, masks = two_object_field()
    full = measure.measure_objects(images, masks, ["granularity"])["Cells"]
    short = measure.measure_objects(images, masks, ["granularity4"])["Cells"]
    first = [f"Granularity_{k}_{ch}" for ch in images for k in range(1, 5)]
    assert [c for c in short.columns if c.startswith("Granularity")] == first
    np.testing.assert_array_equal(short[first].to_numpy(), full[first].to_numpy())


def test_measure_crop_matches_the_field_for_an_object_inside_it():
    images, masks = two_object_field()
    field = measure.measure_objects(images, masks, ["sizeshape", "intensity", "texture"])
    crop = np.stack([images["DNA"][6:74, 0:68], images["Tubulin"][6:74, 0:68]], axis=-1)
    mask = masks["Cells"][6:74, 0:68] == 1
    row = measure.measure_crop(crop, ["DNA", "Tubulin"], mask,
                               ["sizeshape", "intensity", "texture"])
    assert len(row) == 1 and row["ObjectNumber"].tolist() == [1]
    whole = field["Cells"].iloc[0]
    for name in ["AreaShape_Area", "AreaShape_Eccentricity", "Intensity_MeanIntensity_DNA",
                 "Intensity_StdIntensity_Tubulin", "Texture_Contrast_DNA_3_00_256"]:
        assert row[name].iloc[0] == pytest.approx(whole[name]), name
    assert row["Location_Center_X"].iloc[0] == pytest.approx(whole["Location_Center_X"])
    assert row["Location_Center_Y"].iloc[0] == pytest.approx(whole["Location_Center_Y"] - 6)


def test_module_names_are_checked():
    assert measure.resolve_modules("all") == measure.ALL_MODULES
    assert measure.resolve_modules(["default", "costes"]) == measure.DEFAULT_MODULES + ("costes",)
    assert "costes" in measure.ALL_MODULES and "granularity" in measure.ALL_MODULES
    with pytest.raises(UserInputError, match="unknown measurement module 'hairiness'"):
        measure.resolve_modules(["intensity", "hairiness"])
    with pytest.raises(UserInputError, match="no measurement modules"):
        measure.resolve_modules([])


def test_pearson_r_is_scipys_bit_for_bit():
    import scipy.stats

    rng = np.random.default_rng(3)
    for _ in range(2000):
        n = int(rng.integers(2, 300))
        x = rng.random(n) ** int(rng.integers(1, 4))
        y = x * rng.normal() + rng.random(n) * rng.random()
        assert measure.pearson_r(x, y) == float(scipy.stats.pearsonr(x, y)[0])


def test_costes_equal_cp_measure_and_leave_it_as_it_was():
    from cp_measure.core import measurecolocalization

    rng = np.random.default_rng(4)
    first = rng.random((90, 90))
    images = {"A": first, "B": np.clip(0.6 * first + 0.3 * rng.random((90, 90)), 0, 1)}
    labels = np.zeros((90, 90), np.int32)
    for j in range(9):
        row, col = divmod(j, 3)
        labels[row * 30 + 3:row * 30 + 27, col * 30 + 3:col * 30 + 27] = j + 1
    original = measurecolocalization._costes_background_correlation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = measure.measure_objects(images, {"o": labels}, ["costes"], scale_max=65535)["o"]
        theirs = measurecolocalization.get_correlation_costes(images["A"], images["B"], labels,
                                                              scale_max=65535)
    assert measurecolocalization._costes_background_correlation is original
    assert ours["Correlation_Costes_A_B"].tolist() == theirs["Correlation_Costes_1"]
    assert ours["Correlation_Costes_B_A"].tolist() == theirs["Correlation_Costes_2"]
    assert np.isfinite(ours["Correlation_Costes_A_B"]).sum() >= 5


def _crop_objects(rng, n, size=48):
    """n crops [n, size, size] of a bright blob on noise, each with a nucleus (label 1) and,
    in most, a cell around it (label 1 of the second set)."""
    yy, xx = np.mgrid[:size, :size]
    crops, labels = np.empty((n, size, size)), []
    for j in range(n):
        cy, cx = rng.uniform(size * 0.4, size * 0.6, 2)
        r = rng.uniform(5, 9)
        dist = np.hypot(yy - cy, xx - cx)
        crops[j] = np.clip(0.6 * np.exp(-(dist / r) ** 2) + rng.uniform(0, 0.2, (size, size)),
                           0, 1)
        found = {"Nuclei": (dist < r).astype(np.int32)}
        if j % 3:
            found["Cells"] = (dist < 2 * r).astype(np.int32)
        labels.append(found)
    return crops, labels


def test_granularity_of_stacked_crops_is_granularity_crop_by_crop_to_the_bit():
    rng = np.random.default_rng(11)
    dna, labels = _crop_objects(rng, 12)
    actin = np.clip(dna[::-1] * 0.5 + rng.uniform(0, 0.3, dna.shape), 0, 1)
    for spectrum in (4, 16):
        stacked = measure.granularity_of_crops({"DNA": dna, "Actin": actin}, labels, spectrum)
        for j in range(len(dna)):
            alone = measure.granularity({"DNA": dna[j], "Actin": actin[j]}, labels[j], spectrum)
            assert stacked[j].keys() == alone.keys() == labels[j].keys()
            for name in alone:
                assert len(alone[name]) == 2 * spectrum
                for column, values in alone[name].items():
                    assert np.array_equal(stacked[j][name][column], values, equal_nan=True)


def test_reconstruction_by_repeated_dilation_is_skimages():
    import skimage.morphology

    rng = np.random.default_rng(12)
    mask = rng.uniform(0, 1, (5, 17, 17))
    seed = np.minimum(mask, rng.uniform(0, 1, mask.shape) ** 4)
    cross = skimage.morphology.disk(1, dtype=bool)
    mine = measure._reconstruct_by_dilation(seed, mask, cross[None])
    for j in range(len(mask)):
        theirs = skimage.morphology.reconstruction(seed[j], mask[j], footprint=cross)
        assert np.array_equal(mine[j], theirs)
    assert not np.array_equal(mine, seed)  # it did grow the seed
