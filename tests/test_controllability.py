"""controllability: a model that ignores what it is asked scores gain 0, one that draws the asked
change scores 1; the feature choice, slopes and specificity on numbers made here."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cp2image_tf.evaluation.controllability import (choose_features, controllability,
                                                    median_spearman, regression_slope,
                                                    specificity, summarise, within_cell_slope)
from tfrecords_tools.manifest import load_manifest, treatment_cells
from tfrecords_tools.reader import DEFAULT_SCALING, sample_cells, stratified_quota


RIM = 3


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    """The disc dataset with each disc's Actin brightness drawn at random, so that
    Nuclei_Intensity_MeanIntensity_Actin is unrelated to size and DNA brightness (in the plain
    disc dataset Actin is half the DNA level), and a column of CellProfiler eccentricities that
    are noise. The Actin disc reaches RIM pixels beyond the DNA disc: the nucleus found on the
    smoothed DNA grows with its brightness, and should not take in background Actin."""
    import scipy.ndimage
    import tifffile
    from conftest import make_disc_folder
    from tfrecords_tools.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("control")
    cp = make_disc_folder(root)
    nuclei = pd.read_csv(cp / "Nuclei.csv")
    images = pd.read_csv(cp / "Image.csv")
    rng = np.random.default_rng(1)
    actin = np.zeros(len(nuclei))
    for image in images.itertuples():
        dna = tifffile.imread(f"{image.PathName_DNA}/{image.FileName_DNA}")
        labels, _ = scipy.ndimage.label(dna > 500)
        planes = np.full(dna.shape, 500, np.uint16)
        for k in np.flatnonzero(nuclei["ImageNumber"] == image.ImageNumber):
            cell = nuclei.iloc[k]
            level = rng.uniform(6000, 40000)
            disc = labels == labels[int(cell.Location_Center_Y), int(cell.Location_Center_X)]
            planes[scipy.ndimage.binary_dilation(disc, iterations=RIM)] = level
            actin[k] = int(level) / 65535.0
        tifffile.imwrite(f"{image.PathName_Actin}/{image.FileName_Actin}", planes)
    nuclei["Intensity_MeanIntensity_Actin"] = actin
    nuclei["AreaShape_Eccentricity"] = rng.uniform(0, 0.3, len(nuclei))
    nuclei.to_csv(cp / "Nuclei.csv", index=False)
    convert(ConvertConfig(input=str(cp), out_dir=str(root / "data"), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48, split_by=["Metadata_Well"]),
            progress=False)
    return root / "data"


def test_choose_features_takes_the_best_reproduced_of_each_kind():
    ceiling = pd.Series({
        "Nuclei_AreaShape_Area": 0.96, "Nuclei_AreaShape_ConvexArea": 0.99,  # Area: near best
        "Nuclei_AreaShape_Eccentricity": 0.40,  # too poorly re-measured to judge
        "Nuclei_AreaShape_FormFactor": 0.80, "Nuclei_AreaShape_Solidity": 0.90,
        "Nuclei_AreaShape_Orientation": 1.0, "Nuclei_AreaShape_Zernike_0_0": 1.0,  # no kind
        "Nuclei_Intensity_MeanIntensity_DNA": 0.90, "Nuclei_Intensity_MeanIntensity_Actin": 0.95,
        "Nuclei_Intensity_StdIntensity_DNA": 0.99,  # not a mean intensity
        "Nuclei_Texture_Contrast_DNA_3_00_256": 0.70, "Nuclei_Texture_Entropy_DNA_3_00_256": 0.80,
        "Nuclei_Granularity_1_DNA": np.nan, "Nuclei_Granularity_2_Actin": 0.3,
        "Cells_AreaShape_Area": 0.90, "Cells_RadialDistribution_FracAtD_Actin_1of4": 0.85,
        "Cells_Correlation_Correlation_DNA_Actin": 0.99,
    })
    chosen, skipped = choose_features(ceiling, ["DNA", "Actin"])
    got = [(e["feature"], e["kind"], e["channel"]) for e in chosen]
    # Every object's kinds with their best channel first, then the second channels.
    assert got == [
        ("Nuclei_AreaShape_Area", "size", None),
        ("Nuclei_AreaShape_Solidity", "form", None),
        ("Nuclei_Intensity_MeanIntensity_Actin", "intensity", "Actin"),
        ("Nuclei_Texture_Entropy_DNA_3_00_256", "texture", "DNA"),
        ("Cells_AreaShape_Area", "size", None),
        ("Cells_RadialDistribution_FracAtD_Actin_1of4", "radial", "Actin"),
        ("Nuclei_Intensity_MeanIntensity_DNA", "intensity", "DNA"),
    ]
    assert chosen[0]["ceiling_r"] == 0.96
    assert "Nuclei_AreaShape_Eccentricity re-measures at r 0.40" in skipped["Nuclei elongation"]
    assert "r 0.30" in skipped["Nuclei granularity Actin"]
    assert "did not vary" in skipped["Nuclei granularity DNA"]  # no r at all
    limited, skipped = choose_features(ceiling, ["DNA", "Actin"], limit=6)
    assert [e["feature"] for e in limited] == [f for f, _, _ in got[:6]]
    assert skipped["Nuclei intensity DNA"] == "beyond the first 6 features"


def test_slopes_within_cells_and_specificity():
    z = np.tile(np.linspace(-1.5, 1.5, 5), (3, 1))  # 3 cells, 5 steps
    offsets = np.array([[0.0], [10.0], [-4.0]])
    # Within each cell y moves 2 per x; the cells' offsets do not enter the slope.
    y = 2 * z + offsets
    assert within_cell_slope(z[:, :, None], y[:, :, None])[0] == pytest.approx(2.0)
    y_missing = y.copy()
    y_missing[0, 1] = np.nan
    y_missing[1, :4] = np.nan  # one step left: the cell is left out
    assert within_cell_slope(z[:, :, None], y_missing[:, :, None])[0] == pytest.approx(2.0)
    # Features that should not move: slopes 0.1, -0.3, 0 and 1 SD per SD: median |slope| 0.2.
    others = np.stack([0.1 * z, -0.3 * z + offsets, np.ones_like(z), z], axis=-1)
    assert specificity(z, others) == pytest.approx(0.2)
    assert np.isnan(specificity(z, others[:, :, :0]))
    assert regression_slope([1, 2, 3, np.nan], [3, 5, 7, 100]) == pytest.approx(2.0)
    assert np.isnan(regression_slope([1, 1, 1], [1, 2, 3]))
    # Spearman along each cell's steps, median over cells; a flat response counts 0.
    falling = -z[:1] ** 3
    assert median_spearman(z, np.concatenate([z, z ** 3, falling])) == pytest.approx(1.0)
    assert median_spearman(z, np.concatenate([falling, falling, z])) == pytest.approx(-1.0)
    assert median_spearman(z, np.ones_like(z)) == 0.0


def test_summary_per_module_and_overall():
    def row(feature, gain):
        return {"feature": feature, "module": feature.split("_")[1],
                **{way: {"gain": gain, "spearman": 1.0, "specificity": 0.1}
                   for way in ("correlated", "alone", "lookup")}}

    out = summarise([row("Nuclei_AreaShape_Area", 0.2), row("Nuclei_AreaShape_Solidity", 0.4),
                     row("Nuclei_Intensity_MeanIntensity_DNA", 1.0)])
    assert out["modules"]["AreaShape"]["features"] == 2
    assert out["modules"]["AreaShape"]["correlated"]["gain"] == pytest.approx(0.3)
    assert out["summary"]["alone"]["gain"] == pytest.approx(0.4)
    assert out["summary"]["alone"]["lowest_module_gain"] == pytest.approx(0.3)


class DiscModel:
    """A stand-in for a model on the discs: "ignore" draws one fixed real crop whatever it is
    asked; "faithful" a disc of exactly the asked area and DNA and Actin brightness, drawn as
    the dataset's discs are; "leaky" as faithful, but each SD of DNA brightness asked also
    brightens Actin by half an SD."""

    def __init__(self, data, mode: str):
        manifest = load_manifest(data)
        stats = manifest["features"]["stats"]
        self.feature_names = manifest["features"]["names"]
        self.description = {}
        self.source = "a stand-in model"
        self.median = np.asarray(stats["median"], np.float32)
        self.sd = np.asarray(stats["std"], np.float32)
        train = sample_cells(data, manifest, "train", stratified_quota(
            treatment_cells(manifest, "train"), 1000), DEFAULT_SCALING, 0)
        crops, raw = train["crops"], train["raw"]
        self.columns = [self.feature_names.index(f"Nuclei_{name}") for name in (
            "AreaShape_Area", "Intensity_MeanIntensity_DNA", "Intensity_MeanIntensity_Actin")]
        # Crop pixels per CellProfiler intensity unit, and the background, from the real discs.
        self.unit = np.median(crops[:, 24, 24] / raw[:, self.columns[1:]], axis=0)
        self.background = np.median(crops[:, 0, 0], axis=0)
        self.fixed = crops[0]
        self.mode = mode
        self.crop_shape = crops.shape[1:]

    def images(self, raw):
        from skimage.draw import disk

        raw = np.asarray(raw, np.float64)
        if self.mode == "ignore":
            return np.repeat(self.fixed[None], len(raw), axis=0)
        area, dna, actin = raw[:, self.columns].T
        if self.mode == "leaky":
            _, j_dna, j_actin = self.columns
            actin = actin + 0.5 * self.sd[j_actin] * (dna - self.median[j_dna]) / self.sd[j_dna]
        out = np.broadcast_to(self.background, (len(raw), *self.crop_shape)).copy()
        for picture, a, (v_dna, v_actin) in zip(out, area, np.stack([dna, actin], 1) * self.unit):
            radius = np.sqrt(max(a, 1.0) / np.pi)
            picture[(*disk((24, 24), radius + RIM, shape=self.crop_shape[:2]), 1)] = v_actin
            picture[(*disk((24, 24), radius, shape=self.crop_shape[:2]), 0)] = v_dna
        return out.astype(np.float32)


FEATURES = ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA",
            "Nuclei_Intensity_MeanIntensity_Actin"]


@pytest.mark.parametrize("mode", ["ignore", "faithful"])
def test_gain_is_zero_when_ignored_and_one_when_drawn_as_asked(discs, mode):
    section = controllability(DiscModel(discs, mode), discs, cells=4, real_cells=200)
    features = {e["feature"]: e for e in section["features"]}
    assert sorted(features) == sorted(FEATURES)
    assert section["features"][0]["feature"] == FEATURES[0]
    # CellProfiler's eccentricities are noise, and every real disc re-measures 0: not judged.
    assert "did not vary" in section["skipped"]["Nuclei elongation"]
    assert section["cells"] == 4 and not section["pinned"]
    for entry in section["features"]:
        # The real discs' re-measured values follow CellProfiler's, on re-measurement's own
        # scale (crops scaled for the dataset; outlines smoothed): the gain divides by this.
        assert 0.8 < entry["real_slope"] < 2.0, entry["feature"]
        for way in ("correlated", "alone"):
            scored = entry[way]
            asked = np.array(scored["asked"])
            assert asked.shape == (4, 5) and np.ptp(asked, axis=1).min() > 0
            if mode == "ignore":
                assert scored["gain"] == pytest.approx(0.0, abs=1e-9)
                assert scored["spearman"] == 0.0 and scored["specificity"] == 0.0
            else:
                assert scored["gain"] == pytest.approx(1.0, abs=0.1), (entry["feature"], way)
                assert scored["spearman"] >= 0.9  # disc outlines are whole pixels
        # The lookup jumps between real discs: it moves, but not as a drawing of the ask does.
        assert np.isfinite(entry["lookup"]["gain"])
    # Actin brightness is unrelated to size and DNA brightness in training; eccentricity does
    # not vary on real crops, so it is no yardstick.
    assert features[FEATURES[0]]["unrelated_features"] == 1
    assert features[FEATURES[2]]["unrelated_features"] == 2
    expected = 0.0 if mode == "ignore" else 1.0
    for way in ("correlated", "alone"):
        assert section["summary"][way]["gain"] == pytest.approx(expected, abs=0.1)
    assert section["timing"]["measured_crops"] > 0


def test_specificity_sees_what_moves_with_the_asked_feature(discs):
    """DNA brightness moved alone: a faithful drawing leaves the Actin brightness (unrelated in
    training) as it was; one that brightens Actin half an SD per SD asked scores 0.5."""
    faithful = controllability(DiscModel(discs, "faithful"), discs, cells=4)
    leaky = controllability(DiscModel(discs, "leaky"), discs, cells=4)
    dna = {e["feature"]: e for e in faithful["features"]}[FEATURES[1]]
    assert dna["unrelated_features"] == 1  # Actin brightness
    assert dna["alone"]["specificity"] == pytest.approx(0.0, abs=0.01)
    leaked = {e["feature"]: e for e in leaky["features"]}[FEATURES[1]]
    assert leaked["alone"]["specificity"] == pytest.approx(0.5, abs=0.15)
    assert leaked["alone"]["gain"] == pytest.approx(1.0, abs=0.1)  # the asked feature still moves
