"""cp2image_tf.measuring.remeasure: segmenting drawn cells, re-measuring them, planning by feature name."""
import warnings

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from cp2image_tf.measuring import remeasure as rm
from tfrecords_tools.errors import UserInputError

CHANNELS = ["DNA", "Tubulin", "Actin"]
SIZE = 64
CENTRE = (32, 32)


def disc(centre, radius, size=SIZE):
    mask = np.zeros((size, size), bool)
    mask[disk(centre, radius, shape=mask.shape)] = True
    return mask


def draw_cell(nuclei=((CENTRE, 10, 0.6),), cells=((CENTRE, 22, 0.25),), size=SIZE):
    """A (size, size, 3) crop: each nucleus (centre, radius, value) in DNA, each cell in the
    other two channels (the later drawn over the earlier)."""
    crop = np.zeros((size, size, 3), np.float32)
    for centre, radius, value in cells:
        crop[disc(centre, radius, size), 1:] = value
    for centre, radius, value in nuclei:
        crop[disc(centre, radius, size), 0] = value
    return crop


FEATURES = [f"{obj}_{col}" for obj in ("Nuclei", "Cells") for col in (
    "AreaShape_Area", "AreaShape_Zernike_4_2", "AreaShape_MaxFeretDiameter",
    "Intensity_MeanIntensity_DNA", "Intensity_IntegratedIntensity_Actin",
    "Texture_Contrast_DNA_3_00_256", "Granularity_2_Tubulin",
    "RadialDistribution_FracAtD_Actin_2of4")]


@pytest.fixture(scope="module")
def full_plan():
    return rm.plan_measurement(FEATURES, CHANNELS)


def test_disc_is_segmented_and_measured():
    crop = draw_cell()
    plan = rm.plan_measurement(["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA",
                    "Cells_AreaShape_Area", "Cytoplasm_AreaShape_Area",
                    "Cells_Intensity_MeanIntensity_Tubulin"], CHANNELS)
    row = rm.remeasure(crop[None], plan, CHANNELS).iloc[0]
    nucleus, cell = disc(CENTRE, 10).sum(), disc(CENTRE, 22).sum()
    assert row["Nuclei_AreaShape_Area"] == pytest.approx(nucleus, rel=0.05)
    assert row["Nuclei_Intensity_MeanIntensity_DNA"] == pytest.approx(0.6, rel=0.02)
    assert row["Cells_AreaShape_Area"] == pytest.approx(cell, rel=0.05)
    assert row["Cytoplasm_AreaShape_Area"] == (row["Cells_AreaShape_Area"]
                                               - row["Nuclei_AreaShape_Area"])
    assert row["Cells_Intensity_MeanIntensity_Tubulin"] == pytest.approx(0.25, rel=0.02)


def test_masks_are_int32_labels_of_one_object():
    masks = rm.segment(draw_cell(), CHANNELS, {"Nuclei": "nucleus", "Cells": "cell",
                                               "Cytoplasm": "cytoplasm"})
    assert {m.dtype for m in masks.values()} == {np.dtype(np.int32)}
    assert all(set(np.unique(m)) == {0, 1} for m in masks.values())
    assert not (masks["Nuclei"] & masks["Cytoplasm"]).any()
    assert ((masks["Nuclei"] | masks["Cytoplasm"]) == masks["Cells"]).all()


def test_the_central_nucleus_is_kept():
    # A larger, brighter nucleus (and its cell) off-centre does not win.
    crop = draw_cell(nuclei=[(CENTRE, 7, 0.4), ((10, 52), 9, 0.9)],
                     cells=[(CENTRE, 16, 0.2), ((10, 52), 12, 0.3)])
    masks = rm.segment(crop, CHANNELS, {"Nuclei": "nucleus", "Cells": "cell"})
    assert masks["Nuclei"][CENTRE] == 1
    assert masks["Nuclei"].sum() == pytest.approx(disc(CENTRE, 7).sum(), rel=0.05)
    assert masks["Cells"].sum() == pytest.approx(disc(CENTRE, 16).sum(), rel=0.05)


def test_without_a_nucleus_at_the_centre_the_nearest_is_kept():
    crop = draw_cell(nuclei=[((32, 42), 5, 0.5), ((8, 8), 5, 0.5)], cells=[])
    nucleus = rm.segment(crop, CHANNELS, {"Nuclei": "nucleus"})["Nuclei"]
    assert nucleus[32, 42] == 1 and nucleus[8, 8] == 0


def test_touching_cells_are_shared_between_their_nuclei():
    crop = draw_cell(nuclei=[(CENTRE, 6, 0.5), ((32, 56), 6, 0.5)],
                     cells=[(CENTRE, 14, 0.2), ((32, 56), 14, 0.2)])
    cell = rm.segment(crop, CHANNELS, {"Cells": "cell"})["Cells"]
    union = disc(CENTRE, 14) | disc((32, 56), 14)
    own = union & (np.arange(SIZE)[None, :] <= 44)  # the half nearer the central nucleus
    assert cell[CENTRE] == 1 and cell[32, 56] == 0
    assert cell.sum() == pytest.approx(own.sum(), rel=0.05)


def test_a_fitted_threshold_is_one_threshold_for_every_crop():
    sparse = [draw_cell(cells=[(CENTRE, r, 0.2)]) for r in (12, 14, 16)]
    threshold = rm.fit_cell_threshold(np.stack(sparse), CHANNELS)
    assert threshold == pytest.approx(0.1, abs=0.02)  # halfway between background and cells
    roles = {"Cells": "cell"}
    # A cell that fills its crop, with bright fibres.
    dense = draw_cell(cells=[(CENTRE, 31, 0.2)])
    dense[disc(CENTRE, 31) & (np.arange(SIZE)[:, None] % 8 == 0), 1:] = 0.8
    cell = rm.segment(dense, CHANNELS, roles, rm.Segmentation(cell_threshold=threshold))["Cells"]
    assert cell.sum() == pytest.approx(disc(CENTRE, 31).sum(), rel=0.05)
    # A cell fainter than the threshold is not found, though the crop's own threshold finds it.
    faint = draw_cell(cells=[(CENTRE, 20, 0.06)])
    assert rm.segment(faint, CHANNELS, roles)["Cells"].sum() == pytest.approx(
        disc(CENTRE, 20).sum(), rel=0.05)
    assert rm.segment(faint, CHANNELS, roles,
                      rm.Segmentation(cell_threshold=threshold))["Cells"].sum() == \
        disc(CENTRE, 10).sum()


def test_a_blank_crop_gives_nan_not_an_error(full_plan):
    blank = np.zeros((SIZE, SIZE, 3), np.float32)
    masks = rm.segment(blank, CHANNELS, full_plan.objects)
    assert all(m.dtype == np.int32 and not m.any() for m in masks.values())
    frame = rm.remeasure(np.stack([blank, draw_cell(), np.ones_like(blank)]), full_plan,
                         CHANNELS)
    assert list(frame.columns) == FEATURES and (frame.dtypes == np.float64).all()
    assert frame.iloc[[0, 2]].isna().all().all()
    assert frame.iloc[1].notna().all()


def test_plan_picks_objects_modules_and_reasons():
    names = ["Nuclei_AreaShape_Area", "Nuclei_AreaShape_Zernike_3_1", "Nuclei_Granularity_2_DNA",
             "Cells_Texture_Contrast_Actin_3_00_256", "Cells_Granularity_12_Actin",
             "Cells_Granularity_1_DNA", "Cells_RadialDistribution_FracAtD_DNA_1of4",
             "Cells_AreaShape_MaxFeretDiameter", "Cytoplasm_Intensity_MeanIntensity_Tubulin",
             "Nuclei_Location_Center_X", "Cells_AreaShape_Center_Y", "Speckles_AreaShape_Area",
             "Cells_Intensity_MeanIntensity_GFP", "Cells_Texture_Contrast_DNA_5_00_256",
             "Nuclei_Filtered_AreaShape_Area"]
    plan = rm.plan_measurement(names, CHANNELS)
    assert plan.objects == {"Nuclei": "nucleus", "Cells": "cell", "Cytoplasm": "cytoplasm",
                            "Nuclei_Filtered": "nucleus"}
    assert plan.modules == {
        "Nuclei": ("sizeshape", "zernike", "granularity4"),
        "Cells": ("feret", "texture", "granularity", "radial_distribution", "texture:5"),
        "Cytoplasm": ("intensity",),
        "Nuclei_Filtered": ("sizeshape",)}
    # Haralick features at another scale than 3 are measured at theirs.
    assert plan.measurable == names[:9] + names[13:]
    assert list(plan.unmeasurable) == names[9:13]
    reasons = plan.unmeasurable
    assert "position" in reasons["Nuclei_Location_Center_X"]
    assert "position" in reasons["Cells_AreaShape_Center_Y"]
    assert "'Speckles'" in reasons["Speckles_AreaShape_Area"]
    assert "Intensity_MeanIntensity_GFP" in reasons["Cells_Intensity_MeanIntensity_GFP"]


def test_plan_without_anything_measurable_is_a_user_error():
    with pytest.raises(UserInputError, match="none of the 3 features can be re-measured"):
        rm.plan_measurement(["Speckles_AreaShape_Area", "Nuclei_Location_Center_X", "Count_Nuclei"],
                CHANNELS)


def crops_to_measure(n=6, seed=0):
    """Drawn cells of varied size, position and texture; the last one blank."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n - 1):
        cy, cx = rng.integers(28, 37, 2)
        crop = draw_cell(nuclei=[((cy, cx), rng.integers(6, 11), rng.uniform(0.3, 0.8))],
                         cells=[((cy, cx), rng.integers(14, 24), rng.uniform(0.1, 0.3))])
        crops.append(np.clip(crop + rng.normal(0, 0.02, crop.shape), 0, 1))
    crops.append(np.zeros_like(crops[0]))
    return np.stack(crops).astype(np.float32)


def test_two_workers_give_what_one_gives(full_plan):
    crops = crops_to_measure()
    one = rm.remeasure(crops, full_plan, CHANNELS, workers=1, chunk=2)
    two = rm.remeasure(crops, full_plan, CHANNELS, workers=2, chunk=2)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert one.iloc[:-1].notna().all().all() and one.iloc[-1].isna().all()
    # Tiled with others or alone, a crop measures the same.
    alone = pd.DataFrame([rm.measure_masks(c, rm.segment(c, CHANNELS, full_plan.objects),
                                           full_plan, CHANNELS) for c in crops])
    pd.testing.assert_frame_equal(one, alone, rtol=1e-9)


def test_a_module_that_fails_on_one_crop_leaves_only_its_values_nan(full_plan, monkeypatch):
    real = rm.measure_objects
    marker = 0.4375  # one Tubulin pixel of the second crop; exact in float32

    def texture_fails_on_the_marked_crop(images, masks, modules, **kwargs):
        if "texture" in modules and (images["Tubulin"] == marker).any():
            raise ZeroDivisionError("float division by zero")
        return real(images, masks, modules, **kwargs)

    monkeypatch.setattr(rm, "measure_objects", texture_fails_on_the_marked_crop)
    crops = crops_to_measure(4)[:3]
    crops[1, 0, 0, 1] = marker
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = rm.remeasure(crops, full_plan, CHANNELS)
    texture = [c for c in FEATURES if "Texture" in c]
    assert frame.loc[1, texture].isna().all()
    assert frame.loc[[0, 2], texture].notna().all().all()
    assert frame.drop(columns=texture).notna().all().all()
    assert any("texture failed on a crop (ZeroDivisionError" in str(w.message) for w in caught)


def domed_nucleus(crop, centre, radius, peak=0.9, rim=0.4):
    """A nucleus brightest at its centre, as DNA stains are: touching ones have a dim seam."""
    yy, xx = np.mgrid[:crop.shape[0], :crop.shape[1]]
    distance = np.hypot(yy - centre[0], xx - centre[1]) / radius
    inside = distance <= 1
    crop[inside, 0] = np.maximum(crop[inside, 0], rim + (peak - rim) * (1 - distance[inside]))


def test_touching_nuclei_are_declumped_with_a_typical_diameter():
    crop = np.zeros((SIZE, SIZE, 3), np.float32)
    domed_nucleus(crop, CENTRE, 9)
    domed_nucleus(crop, (32, 48), 9)  # 16 px apart: the two discs overlap
    union = disc(CENTRE, 9) | disc((32, 48), 9)
    roles = {"Nuclei": "nucleus"}
    merged = rm.segment(crop, CHANNELS, roles, rm.Segmentation(nucleus_threshold=0.2))["Nuclei"]
    assert merged.sum() == pytest.approx(union.sum(), rel=0.03)
    split = rm.segment(crop, CHANNELS, roles, rm.Segmentation(
        nucleus_threshold=0.2, nucleus_diameter=18))["Nuclei"]
    own = union & (np.arange(SIZE)[None, :] <= 40)  # the half nearer the centre
    assert split[CENTRE] == 1 and split[32, 48] == 0
    assert split.sum() == pytest.approx(own.sum(), rel=0.06)


def test_texture_inside_one_nucleus_does_not_split_it():
    crop = np.zeros((SIZE, SIZE, 3), np.float32)
    crop[disc(CENTRE, 12), 0] = 0.5
    for spot in ((26, 28), (38, 36), (30, 40), (36, 25)):  # bright chromatin spots, no seam
        crop[disc(spot, 2), 0] = 0.75
    whole = rm.segment(crop, CHANNELS, {"Nuclei": "nucleus"},
                       rm.Segmentation(nucleus_threshold=0.25))["Nuclei"]
    nucleus = rm.segment(crop, CHANNELS, {"Nuclei": "nucleus"}, rm.Segmentation(
        nucleus_threshold=0.25, nucleus_diameter=24, seam=0.75))["Nuclei"]
    assert whole.sum() == pytest.approx(disc(CENTRE, 12).sum(), rel=0.02)
    assert (nucleus == whole).all()


def manifest_for(dtype, high, scaling=None, thresholds=None, stats_area=None):
    names = ["Nuclei_AreaShape_Area", "Cells_AreaShape_Area"]
    manifest = {"channels": CHANNELS, "crop": {"dtype": dtype, "dtype_max": 1.0},
                "intensity": {ch: {"high": high} for ch in CHANNELS},
                "source": {"objects": ["Nuclei", "Cells"]},
                "features": {"names": names,
                             "stats": {"median": [stats_area or float("nan"), 900.0]}}}
    if thresholds is not None:
        manifest["cellprofiler"] = {"scaling": {"DNA": scaling}, "thresholds": {
            "Nuclei": {"median": thresholds, "images": 3,
                       "column": "Threshold_FinalThreshold_Nuclei"}}}
    return manifest


def test_nucleus_threshold_comes_from_image_csv_in_the_crops_scale():
    crops = np.stack([draw_cell(nuclei=[(CENTRE, r, 0.6)]) for r in (8, 10, 12)])
    roles = {"Nuclei": "nucleus", "Cells": "cell"}
    # 16-bit crops, CellProfiler divided by 65535 and thresholded at 0.05; the reader maps
    # 32768 to 1.0: the threshold is 0.05 * 65535 / 32768 on the crops' scale.
    settings, origin = rm.dataset_segmentation(
        manifest_for("uint16", 32768.0, None, 0.05, stats_area=314.0), crops, "dataset", roles)
    assert settings.nucleus_threshold == pytest.approx(0.05 * 65535 / 32768)
    assert "Threshold_FinalThreshold_Nuclei" in origin["nucleus_threshold"]
    assert settings.nucleus_diameter == pytest.approx(np.sqrt(4 * 314.0 / np.pi))
    # Image.csv's Scaling_<channel> (a 12-bit camera in 16-bit files) wins over the bit depth.
    settings, _ = rm.dataset_segmentation(
        manifest_for("uint16", 2048.0, 4095.0, 0.05), crops, "dataset", roles)
    assert settings.nucleus_threshold == pytest.approx(0.05 * 4095 / 2048)
    # Corrected crops (convert --illum) are stored in CellProfiler's own units.
    settings, _ = rm.dataset_segmentation(
        manifest_for("float32", 0.5, 255.0, 0.05), crops, "dataset", roles)
    assert settings.nucleus_threshold == pytest.approx(0.1)
    # Without one in Image.csv: pooled over the crops, between background and nuclei; the
    # diameter measured on them (radii 8, 10, 12 -> about 20 px).
    settings, origin = rm.dataset_segmentation(manifest_for("uint16", 1.0), crops, "dataset",
                                               roles)
    assert 0.05 < settings.nucleus_threshold < 0.3  # minimum cross-entropy: near the dim side
    assert origin["nucleus_threshold"] == "pooled over real training crops"
    assert settings.nucleus_diameter == pytest.approx(20, abs=2.5)  # smoothing widens a little


def test_texture_at_the_scale_the_feature_names():
    crop = draw_cell()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    crop[..., 0] *= 1 + 0.5 * np.sin(xx / 1.5)  # texture that differs between scales
    names = ["Nuclei_Texture_Contrast_DNA_3_00_256", "Nuclei_Texture_Contrast_DNA_1_00_256"]
    plan = rm.plan_measurement(names, CHANNELS)
    assert plan.measurable == names and plan.modules["Nuclei"] == ("texture", "texture:1")
    row = rm.remeasure(crop[None], plan, CHANNELS).iloc[0]
    assert np.isfinite(row).all() and row.iloc[0] > 2 * row.iloc[1] > 0


def test_declumping_is_chosen_by_cellprofilers_own_areas():
    rng = np.random.default_rng(0)
    radii = rng.uniform(7, 10, 16)
    settings = rm.Segmentation(dna=0, nucleus_threshold=0.2, nucleus_diameter=17)
    # Each central nucleus touches a neighbour of its own size: CellProfiler split them.
    pairs = []
    for r in radii:
        crop = np.zeros((SIZE, SIZE, 3), np.float32)
        domed_nucleus(crop, CENTRE, r)
        domed_nucleus(crop, (32, 32 + int(1.8 * r)), rng.uniform(6, 11))
        pairs.append(crop)
    areas = np.array([disc(CENTRE, r).sum() for r in radii], float)
    chosen, said = rm.choose_declumping(settings, np.stack(pairs), areas, "Nuclei_AreaShape_Area")
    assert chosen.nucleus_diameter == 17 and said.startswith("declumped")
    # Lone nuclei with bright spots: splitting them only loses; texture is no seam.
    spotted = []
    for r in radii:
        crop = np.zeros((SIZE, SIZE, 3), np.float32)
        crop[disc(CENTRE, r), 0] = 0.5
        for dy, dx in rng.integers(-4, 5, (4, 2)):
            crop[disc((32 + dy, 32 + dx), 1.5), 0] = 0.8
        spotted.append(crop)
    chosen, said = rm.choose_declumping(settings, np.stack(spotted), areas, "Nuclei_AreaShape_Area")
    assert chosen.nucleus_diameter is None or chosen.seam > 0, said
    assert "training crops" in said


def test_granularity_falls_back_crop_by_crop_when_the_stack_raises(full_plan, monkeypatch):
    assert "granularity" in {m for found in full_plan.modules.values() for m in found} or \
        "granularity4" in {m for found in full_plan.modules.values() for m in found}
    crops = crops_to_measure()
    stacked = rm.remeasure(crops, full_plan, CHANNELS, workers=1, chunk=4)
    calls = []

    def fails(*args, **kwargs):
        calls.append(1)
        raise ValueError("a stack cp-measure chokes on")

    monkeypatch.setattr(rm, "granularity_of_crops", fails)
    one_by_one = rm.remeasure(crops, full_plan, CHANNELS, workers=1, chunk=4)
    assert calls  # the stacked path was taken, and failed
    pd.testing.assert_frame_equal(stacked, one_by_one, check_exact=True)
    granularity = [c for c in stacked.columns if "Granularity" in c]
    assert granularity and stacked[granularity].iloc[:-1].notna().all().all()
