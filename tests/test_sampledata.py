"""The embedded sample dataset: layout, determinism, files, masks and treatment effects."""
import filecmp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from skimage.measure import regionprops_table

from cp2image_tf import sampledata as sd
from tfrecords_tools.errors import UserInputError

CELLS = 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with seed 1 (one and two workers) and one with seed 2 (not measured), 40 cells."""
    root = tmp_path_factory.mktemp("sample")
    a = sd.make_sample_data(root / "a", cells=CELLS, seed=1, workers=1, progress=False)
    b = sd.make_sample_data(root / "b", cells=CELLS, seed=1, workers=2, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sd, "_measure", lambda *args, **kwargs: None)
        c = sd.make_sample_data(root / "c", cells=CELLS, seed=2, workers=1, progress=False)
    return {name: Path(run["out_dir"]) for name, run in zip("abc", (a, b, c))}


def _files(root, pattern):
    return sorted(p.relative_to(root) for p in root.glob(pattern))


def _masks(root, row):
    return [tifffile.imread(root / row[f"ObjectsPathName_{obj}"] / row[f"ObjectsFileName_{obj}"])
            for obj in ("Nuclei", "Cells")]


def test_layout_of_the_default_dataset():
    plans = sd.plan_fields(2000, seed=0)
    assert sum(plan.n_cells for plan in plans) == 2000
    assert all(17 <= plan.n_cells <= 31 for plan in plans)
    assert [plan.image_number for plan in plans] == list(range(1, len(plans) + 1))
    wells = {}
    for plan in plans:
        wells.setdefault(plan.treatment, set()).add((plan.plate, plan.well))
    assert sorted(wells) == sorted(t.name for t in sd.TREATMENTS)
    # 2 plates x 3 replicate wells: a split by well leaves every treatment wells for training.
    assert all(len(w) == 6 for w in wells.values())
    assert len({(plan.plate, plan.well, plan.site) for plan in plans}) == len(plans)
    assert min(sum(p.treatment == t for p in plans) for t in wells) >= 12


def test_small_counts_still_reach_every_treatment():
    plans = sd.plan_fields(CELLS, seed=3)
    assert sorted(p.treatment for p in plans) == sorted(t.name for t in sd.TREATMENTS)
    assert sum(p.n_cells for p in plans) == CELLS


def test_same_seed_same_bytes_whatever_the_workers(runs):
    a, b, c = runs["a"], runs["b"], runs["c"]
    tiffs = _files(a, "**/*.tif")
    assert len(tiffs) == 7 * 5 and tiffs == _files(b, "**/*.tif")
    for name in tiffs + [Path("ground_truth.csv"), Path("load_data.csv"),
                         Path("cellprofiler/Nuclei.csv"), Path("cellprofiler/Cells.csv")]:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert not filecmp.cmp(a / tiffs[0], c / tiffs[0], shallow=False)
    truth_a = pd.read_csv(a / "ground_truth.csv")
    truth_c = pd.read_csv(c / "ground_truth.csv")
    assert len(truth_a) == len(truth_c) == CELLS
    assert not np.allclose(truth_a["Nucleus_Center_X"], truth_c["Nucleus_Center_X"])


def test_images_are_16_bit_fields_in_a_realistic_range(runs):
    root = runs["a"]
    load = pd.read_csv(root / "load_data.csv")
    for _, row in load.iterrows():
        nuclei, cells = _masks(root, row)
        for ch in sd.CHANNELS:
            img = tifffile.imread(root / row[f"PathName_{ch}"] / row[f"FileName_{ch}"])
            assert img.dtype == np.uint16 and img.shape == sd.FIELD_SHAPE
            assert img.max() < 50000, "nothing saturates"
            background = np.median(img[cells == 0])
            assert 500 <= background <= 2000
            assert np.percentile(img[cells > 0], 99) > 1.5 * background
        dna = tifffile.imread(root / row["PathName_DNA"] / row["FileName_DNA"])
        assert np.median(dna[nuclei > 0]) > np.median(dna[cells == 0]) + 2000


def test_masks_match_the_ground_truth_and_nuclei_lie_in_their_cells(runs):
    root = runs["a"]
    load = pd.read_csv(root / "load_data.csv")
    truth = pd.read_csv(root / "ground_truth.csv")
    assert list(load["ImageNumber"]) == sorted(truth["ImageNumber"].unique())
    for _, row in load.iterrows():
        for column in ("Plate", "Well", "Site", "Treatment"):
            assert set(truth.loc[truth.ImageNumber == row.ImageNumber, f"Metadata_{column}"]) \
                == {row[f"Metadata_{column}"]}
        expected = truth.loc[truth.ImageNumber == row.ImageNumber]
        nuclei, cells = _masks(root, row)
        assert nuclei.dtype == cells.dtype == np.uint16
        numbers = sorted(expected["ObjectNumber"])
        assert numbers == list(range(1, len(expected) + 1))
        assert sorted(np.unique(nuclei[nuclei > 0])) == numbers
        assert sorted(np.unique(cells[cells > 0])) == numbers
        assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
        areas = np.bincount(nuclei.ravel(), minlength=len(numbers) + 1)[1:]
        assert np.array_equal(areas, expected.sort_values("ObjectNumber")["Nucleus_Area"])
        # The recorded centre lies in that object's nucleus.
        y = expected["Nucleus_Center_Y"].round().astype(int)
        x = expected["Nucleus_Center_X"].round().astype(int)
        assert np.array_equal(nuclei[y, x], expected["ObjectNumber"])


def test_load_data_paths_are_relative_and_resolve(runs):
    root = runs["a"]
    load = pd.read_csv(root / "load_data.csv")
    for ch in sd.CHANNELS:
        assert not any(Path(p).is_absolute() for p in load[f"PathName_{ch}"])
        files = zip(load[f"PathName_{ch}"], load[f"FileName_{ch}"])
        assert all((root / folder / name).is_file() for folder, name in files)
    assert "NucEnlarge" in (root / "README.txt").read_text()


def test_measurements_agree_with_what_was_drawn(runs):
    root = runs["a"]
    truth = pd.read_csv(root / "ground_truth.csv")
    nuclei = pd.read_csv(root / "cellprofiler" / "Nuclei.csv")
    cells = pd.read_csv(root / "cellprofiler" / "Cells.csv")
    image = pd.read_csv(root / "cellprofiler" / "Image.csv")
    assert len(image) == 7 and "Metadata_Treatment" in image
    moa = dict(zip(image["Metadata_Treatment"], image["Metadata_MoA"]))
    assert moa["MTDepoly"] == moa["ActinStab"] == "cytoskeletal" and moa["DMSO"] == "control"
    key = ["ImageNumber", "ObjectNumber"]
    merged = truth.merge(nuclei, on=key, validate="one_to_one")
    assert len(merged) == len(nuclei) == CELLS
    assert np.allclose(merged["AreaShape_Area"], merged["Nucleus_Area"], rtol=0.03)
    assert np.allclose(merged["Location_Center_X"], merged["Nucleus_Center_X"], atol=1.5)
    # Every cell has a whole 68 x 68 crop around its nucleus centroid (convert's --edge skip).
    for axis, size in (("X", sd.FIELD_SHAPE[1]), ("Y", sd.FIELD_SHAPE[0])):
        start = np.floor(nuclei[f"Location_Center_{axis}"] + 0.5) - 34
        assert start.min() >= 0 and (start + 68).max() <= size
    merged = truth.merge(cells, on=key, validate="one_to_one")
    assert len(merged) == CELLS
    assert np.allclose(merged["AreaShape_Area"], merged["Cell_Area"], rtol=0.03)


def _field_measurements(treatment, n_fields=2):
    """Per-cell values measured from drawn fields (masks and images), not from parameters."""
    rows = []
    for f in range(n_fields):
        seed = np.random.SeedSequence([11, sd.TREATMENTS.index(sd.TREATMENT_BY_NAME[treatment]), f])
        images, nuclei, cells, _ = sd.draw_field(24, treatment, seed)
        background = {ch: np.median(images[ch][cells == 0]) for ch in sd.CHANNELS}
        n = regionprops_table(nuclei, images["DNA"] - background["DNA"],
                              properties=("area", "major_axis_length", "minor_axis_length",
                                          "intensity_mean"))
        c = regionprops_table(cells, images["Actin"] - background["Actin"],
                              properties=("area", "intensity_mean"))
        cytoplasm = (cells > 0) & (nuclei == 0)
        label, tubulin = cells[cytoplasm], images["Tubulin"][cytoplasm].astype(float)
        count = np.bincount(label)[1:]
        mean = np.bincount(label, tubulin)[1:] / count
        spread = np.sqrt(np.bincount(label, tubulin ** 2)[1:] / count - mean ** 2)
        rows.append(pd.DataFrame({
            "nucleus_area": n["area"],
            "elongation": n["major_axis_length"] / n["minor_axis_length"],
            "dna": n["intensity_mean"], "cell_area": c["area"], "actin": c["intensity_mean"],
            "tubulin_cv": spread / mean}))
    return pd.concat(rows).mean()


def test_treatments_shift_what_they_document():
    m = {t.name: _field_measurements(t.name) for t in sd.TREATMENTS}
    control = m["DMSO"]
    assert m["NucEnlarge"].nucleus_area > 1.5 * control.nucleus_area
    assert m["NucElongate"].elongation > control.elongation + 0.6
    assert m["DNACondense"].dna > 1.6 * control.dna
    assert m["DNACondense"].nucleus_area < 0.8 * control.nucleus_area
    assert m["CellSpread"].cell_area > 1.6 * control.cell_area
    assert m["MTDepoly"].tubulin_cv < 0.8 * control.tubulin_cv
    assert m["ActinStab"].actin > 1.3 * control.actin
    # Effects are specific: the cell-spreading treatment leaves nuclei alone.
    assert abs(m["CellSpread"].nucleus_area / control.nucleus_area - 1) < 0.15


def test_existing_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="--overwrite") as err:
        sd.make_sample_data(out, cells=CELLS, progress=False)
    assert str(out) in str(err.value)
    assert (out / "old.txt").read_text() == "keep me"

    from cli.main import main
    result = CliRunner().invoke(main, ["sample-data", str(out), "--cells", "40"])
    assert result.exit_code == 1
    assert "--overwrite" in result.output and "Traceback" not in result.output


def test_overwrite_replaces_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "_measure", lambda *args, **kwargs: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    summary = sd.make_sample_data(out, cells=8, overwrite=True, workers=1, progress=False)
    assert not (out / "old.txt").exists()
    assert summary["cells"] == 8 and sum(summary["cells_per_treatment"].values()) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folders left"
