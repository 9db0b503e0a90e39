"""cp2image_tf.metrics: pixel metrics, feature correlations, module tables, treatment profiles."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cp2image_tf import metrics
from cp2image_tf.metrics import (feature_correlations, module_of, module_summary, pixel_metrics,
                                 profile_agreement, standardize, summarize, treatment_profiles)


def random_crops(n=6, size=24, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, size, size, channels)).astype(np.float32)


def test_identical_images_are_perfect():
    real = random_crops()
    out = pixel_metrics(real, real)
    np.testing.assert_array_equal(out["mse"], 0.0)
    np.testing.assert_allclose(out["ssim"], 1.0, atol=1e-6)
    np.testing.assert_array_equal(out["psnr"], metrics.PSNR_CAP)
    assert summarize(out["psnr"]) == {"mean": 100.0, "median": 100.0, "n": 6}


def test_known_scaling_gives_expected_psnr():
    real = np.full((2, 16, 16, 2), 0.8, np.float32)
    out = pixel_metrics(real * 0.5, real)
    np.testing.assert_allclose(out["mse"], 0.16, rtol=1e-6)
    np.testing.assert_allclose(out["psnr"], 10 * np.log10(1 / 0.16), rtol=1e-6)
    assert out["psnr"][0] == pytest.approx(7.96, abs=0.005)


def test_ssim_is_tensorflows_and_the_training_loops(monkeypatch):
    import tensorflow as tf

    from cp2image_tf.training.validation import pixel_metrics as train_pixel_metrics

    monkeypatch.setattr(metrics, "SSIM_BATCH", 4)  # several batches, the last one short
    real = random_crops(n=10, size=9, seed=1)  # filter_size min(11, 9)
    pred = np.clip(real + 0.2 * random_crops(n=10, size=9, seed=2) - 0.1, 0, 1)
    out = pixel_metrics(pred, real)
    direct = tf.image.ssim(tf.constant(pred), tf.constant(real), max_val=1.0, filter_size=9).numpy()
    np.testing.assert_allclose(out["ssim"], direct, atol=1e-6)
    mse, ssim = train_pixel_metrics(pred, real)
    assert out["mse"].mean() == pytest.approx(mse, rel=1e-12)
    assert out["ssim"].mean() == pytest.approx(ssim, abs=1e-6)
    assert 0 < out["ssim"].min() < out["ssim"].max() < 1


def test_single_mean_image_is_broadcast():
    real = random_crops(n=5)
    mean_image = real.mean(axis=0)
    out = pixel_metrics(mean_image, real)
    full = pixel_metrics(np.broadcast_to(mean_image, real.shape), real)
    assert out["mse"].shape == (5,)
    for key in ("mse", "psnr", "ssim"):
        np.testing.assert_allclose(out[key], full[key], rtol=1e-12)
    np.testing.assert_allclose(out["mse"], ((real.astype(np.float64) - mean_image) ** 2).mean(axis=(1, 2, 3)))


def test_summarize_ignores_non_finite():
    assert summarize(np.array([1.0, 2.0, 6.0, np.nan, np.inf])) == {"mean": 3.0, "median": 2.0, "n": 3}
    empty = summarize(np.array([np.nan]))
    assert empty["n"] == 0 and np.isnan(empty["mean"]) and np.isnan(empty["median"])


def correlation_frames(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    inputs = pd.DataFrame({"same": a, "monotone": a, "shuffled": a, "constant": a,
                           "holes": a, "only_inputs": a})
    measured = pd.DataFrame({"holes": a.copy(), "shuffled": rng.permutation(a), "same": a,
                             "monotone": np.exp(2 * a), "constant": np.full(n, 0.1),
                             "only_measured": a})
    measured.loc[:99, "holes"] = np.nan
    inputs.loc[50:149, "holes"] = np.inf
    return inputs, measured


def test_feature_correlations_values():
    inputs, measured = correlation_frames()
    out = feature_correlations(inputs, measured)
    assert list(out.index) == ["holes", "shuffled", "same", "monotone", "constant"]
    assert list(out.columns) == ["pearson", "spearman", "n"]
    assert out.loc["same", "pearson"] == pytest.approx(1.0) and out.loc["same", "spearman"] == pytest.approx(1.0)
    assert out.loc["monotone", "spearman"] == pytest.approx(1.0)
    assert out.loc["monotone", "pearson"] < 0.9
    assert abs(out.loc["shuffled", "pearson"]) < 0.1 and abs(out.loc["shuffled", "spearman"]) < 0.1
    assert np.isnan(out.loc["constant", "pearson"]) and np.isnan(out.loc["constant", "spearman"])
    assert out.loc["holes", "n"] == 2000 - 150 and out.loc["same", "n"] == 2000
    assert out.loc["holes", "pearson"] == pytest.approx(1.0)


def test_feature_correlations_matches_scipy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    y = 0.5 * x + rng.normal(size=(300, 4))
    y[:, 3] = np.round(y[:, 3])  # ties
    x[rng.random((300, 4)) < 0.1] = np.nan
    y[rng.random((300, 4)) < 0.1] = np.nan
    cols = list("abcd")
    out = feature_correlations(pd.DataFrame(x, columns=cols), pd.DataFrame(y, columns=cols))
    for j, c in enumerate(cols):
        ok = np.isfinite(x[:, j]) & np.isfinite(y[:, j])
        assert out.loc[c, "n"] == ok.sum()
        assert out.loc[c, "pearson"] == pytest.approx(stats.pearsonr(x[ok, j], y[ok, j])[0], abs=1e-10)
        assert out.loc[c, "spearman"] == pytest.approx(stats.spearmanr(x[ok, j], y[ok, j])[0], abs=1e-10)


def test_feature_correlations_min_cells_and_row_alignment():
    x = pd.DataFrame({"f": np.arange(12.0)}, index=[f"c{i}" for i in range(12)])
    reversed_rows = x.iloc[::-1]  # same cells, other order: matched by label
    assert feature_correlations(x, reversed_rows)["pearson"].iloc[0] == pytest.approx(1.0)
    assert np.isnan(feature_correlations(x, x, min_cells=13)["pearson"].iloc[0])


@pytest.mark.parametrize("name, module", [
    ("Nuclei_AreaShape_Area", "AreaShape"),
    ("Cells_Intensity_MeanIntensity_DNA", "Intensity"),
    ("Nuclei_AreaShape_Zernike_3_1", "Zernike"),
    ("Cells_Texture_Contrast_Actin_3_00_256", "Texture"),
    ("Nuclei_Granularity_2_DNA", "Granularity"),
    ("Cells_RadialDistribution_FracAtD_Tubulin_2of4", "RadialDistribution"),
    ("Nuclei_AreaShape_MaxFeretDiameter", "AreaShape"),
    ("Cells_Correlation_Correlation_DNA_Actin", "Correlation"),
    ("Cells_Location_CenterMassIntensity_X_DNA", "Location"),
])
def test_module_of(name, module):
    assert module_of(name) == module


def test_module_summary_by_hand():
    model = pd.DataFrame({"pearson": [0.9, 0.5, np.nan, 0.8, 0.75, 0.1, 0.95]}, index=[
        "Nuclei_AreaShape_Area", "Nuclei_AreaShape_Perimeter", "Nuclei_AreaShape_MaxFeretDiameter",
        "Nuclei_AreaShape_Zernike_2_0", "Cells_Intensity_MeanIntensity_DNA",
        "Cells_Texture_Contrast_DNA_3_00_256", "Cells_Correlation_Correlation_DNA_Actin"])
    mean_image = pd.DataFrame({"pearson": [np.nan, np.nan]},
                              index=["Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA"])
    out = module_summary({"model": model, "mean image": mean_image}, threshold=0.7)
    assert list(out.columns) == ["module", "method", "n_features", "n_nan", "median_r", "fraction"]
    assert list(out["module"][::2]) == ["AreaShape", "Zernike", "Intensity", "Texture", "Correlation", "all"]
    assert list(out["method"][:2]) == ["model", "mean image"]
    rows = out.set_index(["module", "method"])
    # AreaShape, model: r = 0.9, 0.5, NaN -> 0.9, 0.5, 0 -> median 0.5; 1 of 3 >= 0.7
    assert rows.loc[("AreaShape", "model"), "median_r"] == pytest.approx(0.5)
    assert rows.loc[("AreaShape", "model"), "fraction"] == pytest.approx(1 / 3)
    assert rows.loc[("AreaShape", "model"), ["n_features", "n_nan"]].tolist() == [3, 1]
    assert rows.loc[("Zernike", "model"), "fraction"] == 1.0
    # all, model: 0.9, 0.5, 0, 0.8, 0.75, 0.1, 0.95 -> sorted 0, 0.1, 0.5, 0.75, ... -> median 0.75; 4 of 7
    assert rows.loc[("all", "model"), "median_r"] == pytest.approx(0.75)
    assert rows.loc[("all", "model"), "fraction"] == pytest.approx(4 / 7)
    # mean image: every r NaN -> median 0, fraction 0; no Zernike feature -> n 0, NaN
    assert rows.loc[("all", "mean image"), ["n_features", "median_r", "fraction"]].tolist() == [2, 0.0, 0.0]
    assert rows.loc[("Zernike", "mean image"), "n_features"] == 0
    assert np.isnan(rows.loc[("Zernike", "mean image"), "median_r"])


def test_standardize_uses_reference_and_drops_constant_columns():
    reference = pd.DataFrame({"a": [1.0, 3.0, np.nan, np.inf], "b": [2.0, 2.0, 2.0, 2.0],
                              "c": [np.nan] * 4})
    frame = pd.DataFrame({"a": [2.0, 5.0, np.inf], "b": [1.0, 2.0, 3.0], "c": [1.0, 2.0, 3.0]})
    out, dropped = standardize(frame, reference)
    assert dropped == ["b", "c"]
    assert list(out.columns) == ["a"]
    np.testing.assert_allclose(out["a"], [0.0, 3.0, np.nan])  # mean 2, std 1 (ddof 0)


def test_treatment_profiles_means_per_sorted_treatment():
    measured = pd.DataFrame({"a": [1.0, 3.0, 10.0, np.nan, np.inf], "b": [0.0, 2.0, 4.0, 6.0, 8.0]})
    out = treatment_profiles(measured, ["t2", "t2", "t1", "t1", "t1"])
    assert list(out.index) == ["t1", "t2"]
    np.testing.assert_allclose(out.to_numpy(), [[10.0, 6.0], [2.0, 1.0]])


def real_profiles(t=5, f=40, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(t, f)), index=[f"t{i}" for i in range(t)],
                        columns=[f"f{j}" for j in range(f)])


def test_profile_agreement_identical_profiles():
    real = real_profiles()
    out = profile_agreement(real.iloc[::-1, ::-1], real)  # matched by label
    assert all(r == pytest.approx(1.0) for r in out["per_treatment"].values())
    assert out["median_r"] == pytest.approx(1.0)
    assert out["retrieval_top1"] == 1.0
    assert out["retrieved"] == {t: t for t in real.index}
    assert out["chance"] == pytest.approx(1 / 5)


def test_profile_agreement_permuted_profiles_are_never_retrieved():
    real = real_profiles()
    shifted = pd.DataFrame(np.roll(real.to_numpy(), 1, axis=0), index=real.index, columns=real.columns)
    out = profile_agreement(shifted, real)
    assert out["retrieval_top1"] == 0.0
    assert out["retrieved"] == {"t0": "t4", "t1": "t0", "t2": "t1", "t3": "t2", "t4": "t3"}


def test_profile_agreement_nan_and_ties_fail():
    real = real_profiles(t=3)
    generated = real.copy()
    generated.loc["t0"] = np.nan
    generated.loc["t0", "f0"] = 1.0  # one finite feature: NaN r
    real.loc["t2"] = real.loc["t1"]  # t1 and t2 tie for both generated t1 and t2
    generated.loc["t2"] = real.loc["t1"]
    out = profile_agreement(generated, real)
    assert np.isnan(out["per_treatment"]["t0"])
    assert out["retrieved"]["t0"] is None
    assert out["retrieval_top1"] == 0.0
    assert out["median_r"] == pytest.approx(1.0)  # 0 (NaN), 1, 1


# Distribution distances: Fréchet distance and KID on feature vectors.

def test_frechet_distance_of_sample_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(300, 8))
    assert abs(metrics.frechet_distance(a, a)) < 1e-6


def test_frechet_distance_1d_matches_moments():
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 2.0, size=(200, 1))
    b = rng.normal(-0.5, 0.7, size=(150, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_2d_diagonal_closed_form():
    # Points (+-x, 0), (0, +-y) have exactly diagonal sample covariance diag(2x^2/3, 2y^2/3).
    def cross(x, y, shift):
        return np.array([[x, 0.0], [-x, 0.0], [0.0, y], [0.0, -y]]) + shift
    a = cross(1.0, 3.0, np.array([0.0, 0.0]))
    b = cross(2.0, 0.5, np.array([1.0, -2.0]))
    var_a = np.array([2 / 3, 2 * 9 / 3])
    var_b = np.array([2 * 4 / 3, 2 * 0.25 / 3])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_shift_adds_dimension():
    d = 10
    a = np.random.default_rng(2).normal(size=(500, d))
    assert metrics.frechet_distance(a, a + 1.0) == pytest.approx(d, abs=1e-6)


def test_frechet_distance_singular_covariance_is_finite():
    a = np.random.default_rng(3).normal(size=(5, 12))  # N < d: singular covariances
    b = np.random.default_rng(4).normal(size=(5, 12))
    value = metrics.frechet_distance(a, b)
    assert np.isfinite(value) and value >= 0


def naive_kid(a, b):
    d = a.shape[1]
    k = lambda x, y: (np.dot(x, y) / d + 1.0) ** 3
    m = len(a)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_naive_double_loop():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 3)), rng.normal(0.3, 1.2, size=(6, 3))
    mean, std = metrics.kernel_inception_distance(a, b, subsets=1, subset_size=6)
    assert mean == pytest.approx(naive_kid(a, b), abs=1e-10)
    assert std == 0.0


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2000, 20)), rng.normal(size=(2000, 20))
    same, same_std = metrics.kernel_inception_distance(a, b, subsets=10, subset_size=500)
    assert abs(same) < 0.01 or abs(same) < 2 * same_std
    shifted, _ = metrics.kernel_inception_distance(a, b + 0.5, subsets=10, subset_size=500)
    assert shifted > 0 and shifted > 10 * abs(same)


def test_kid_of_subsets_holding_every_row_is_the_whole_samples_mmd_once():
    # m = both samples' size: each of the 100 subsets is the whole of each sample, reordered;
    # the value is the whole samples' MMD^2, as the mean over the reordered copies gives it.
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(40, 4)), rng.normal(0.2, 1.1, size=(40, 4))
    mean, std = metrics.kernel_inception_distance(a, b, subsets=100, subset_size=1000)
    assert mean == pytest.approx(naive_kid(a, b), rel=1e-12) and std == 0.0
    draw, copies = np.random.default_rng(0), []
    for _ in range(100):
        copies.append(naive_kid(a[draw.permutation(40)], b[draw.permutation(40)]))
    assert mean == pytest.approx(np.mean(copies), rel=1e-12)
    assert np.std(copies) < 1e-12 * abs(mean)
    # One sample larger: subsets of the smaller size are drawn, and they differ.
    mean, std = metrics.kernel_inception_distance(a, b[:30], subsets=20, subset_size=1000)
    assert std > 1e-6


def test_kid_is_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(250, 5))
    first = metrics.kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=3)
    assert metrics.kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=3) == first
    assert metrics.kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=4) != first


@pytest.mark.parametrize("fn", [metrics.frechet_distance, metrics.kernel_inception_distance])
def test_distribution_distances_reject_bad_input(fn):
    a = np.random.default_rng(8).normal(size=(20, 3))
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[4, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            fn(a, b)
        with pytest.raises(ValueError, match="non-finite"):
            fn(b, a)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fn(a, a[:1])
    with pytest.raises(ValueError):
        fn(a, a[:, :2])


def test_frechet_distance_with_a_constant_sample_and_few_rows():
    """One picture for every cell (zero covariance) and 10 cells of 60 features, as a small
    treatment of the mean-image baseline gives: finite, and the closed form when one side is
    constant: |mu_a - mu_b|^2 + Tr(S_b)."""
    rng = np.random.default_rng(3)
    real = rng.normal(size=(10, 60))
    constant = np.repeat(rng.normal(size=(1, 60)), 10, axis=0)
    expected = ((constant.mean(0) - real.mean(0)) ** 2).sum() + np.trace(np.cov(real, rowvar=False))
    assert metrics.frechet_distance(constant, real) == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(metrics.frechet_distance(real, rng.normal(size=(10, 60))))
