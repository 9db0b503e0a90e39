"""The measurer's training views: each turned or mirrored crop comes with the profile
CellProfiler's measurements give that view (checked with cp-measure itself)."""
import numpy as np
import pytest

from cp2image_tf.training.shared.symmetry import random_views, texture_direction, view_maps

NAMES = [f"Cells_Texture_Contrast_DNA_3_0{d}_256" for d in range(4)] + [
    "Cells_AreaShape_Orientation", "Cells_Intensity_MeanIntensity_DNA",
    "Nuclei_Texture_Contrast_Orig_DNA_5_1", "Nuclei_Texture_Contrast_Orig_DNA_5_3",
    "Nuclei_Texture_Contrast_Orig_DNA_5_0", "Cells_Location_Center_X"]


def test_texture_directions_are_read_from_both_naming_styles():
    assert texture_direction("Cells_Texture_Contrast_DNA_3_02_256") == (5, 2)
    assert texture_direction("Nuclei_Texture_Contrast_Orig_DNA_5_1") == (6, 1)
    assert texture_direction("Cells_Intensity_MeanIntensity_DNA") is None


def test_view_maps_permute_directions_and_leave_out_what_they_cannot_say():
    sources, weights = view_maps(NAMES)
    assert sources.shape == weights.shape == (8, len(NAMES))
    np.testing.assert_array_equal(sources[0], np.arange(len(NAMES)))   # as it is
    assert weights[0].min() == 1.0
    quarter = dict(enumerate(sources[2]))                               # one quarter turn
    assert [quarter[i] for i in range(4)] == [2, 3, 0, 1]
    assert quarter[5] == 5 and weights[2][5] == 1.0                     # intensity: unchanged
    assert weights[2][4] == 0.0 and weights[4][4] == 1.0                # orientation: half turn only
    assert weights[:, 9].tolist() == [1.0] + [0.0] * 7                  # location: never
    mirror = sources[1]
    assert [mirror[i] for i in range(4)] == [0, 3, 2, 1]
    # CellProfiler 2 names: direction 1 has a partner (3), direction 0 none to swap with; the
    # quarter turn needs direction 2, which this list lacks: left out.
    assert mirror[6] == 7 and weights[2][8] == 0.0 and sources[4][8] == 8
    rect_sources, _ = view_maps(NAMES, square=False)
    assert len(rect_sources) == 4                                       # no quarter turns


def test_random_views_carry_the_profile_cp_measure_gives_each_view():
    tf = pytest.importorskip("tensorflow")
    from cp_measure.bulk import get_core_measurements

    texture = get_core_measurements()["texture"]
    rng = np.random.default_rng(0)
    image = rng.random((40, 40)) * 0.2
    image[:, ::2] += 0.8          # stripes: directions differ by a factor of 15
    image[::5, :] += 0.3
    image /= image.max()
    mask = np.zeros((40, 40))
    mask[5:35, 8:30] = 1          # not symmetric under a quarter turn

    def measure(img, msk):
        values = texture(msk.astype(int), img)
        return [float(values[f"Contrast_3_0{d}_256"][0]) for d in range(4)]

    profile = np.array(measure(image, mask) + [30.0, 0.5], np.float32)
    names = NAMES[:6]
    sources, weights = view_maps(names)
    crops = np.repeat(np.stack([image, mask], -1)[None].astype(np.float32), 24, 0)
    views, features, w = random_views(tf.constant(crops), tf.constant(np.repeat(profile[None], 24, 0)),
                                      tf.constant(sources), tf.constant(weights),
                                      tf.constant([0, 7], tf.int64))
    views, features, w = views.numpy(), features.numpy(), w.numpy()
    seen = set()
    for view, f, weight in zip(views, features, w):
        kind = next((k, m) for k in range(4) for m in (0, 1)
                    if np.array_equal(view, np.fliplr(np.rot90(crops[0], k)) if m else np.rot90(crops[0], k)))
        seen.add(kind)
        np.testing.assert_allclose(f[:4], measure(view[..., 0].astype(np.float64), view[..., 1]),
                                   rtol=1e-4)
        assert f[5] == profile[5]
        assert weight[4] == (1.0 if kind in ((0, 0), (2, 0)) else 0.0)
    assert len(seen) >= 6         # the seed reaches most of the eight views
