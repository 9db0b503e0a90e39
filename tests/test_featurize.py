"""cp2image_tf.measuring.featurize: a LoadData CSV in, CellProfiler's Image.csv and object CSVs out."""
import os

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from cp2image_tf.measuring.featurize import featurize
from tfrecords_tools.errors import UserInputError

MODULES = ["sizeshape", "intensity"]
DNA_LEVEL, TUBULIN_LEVEL = 30000, 5000


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_experiment(root, absolute=False):
    """Two image sets of 64x64 uint16 TIFFs: two nuclei in the first, one in the second."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    centres = [[(20, 16, 8), (44, 46, 6)], [(32, 30, 10)]]  # (y, x, r) per nucleus
    rows = []
    for i, nuclei in enumerate(centres):
        label = np.zeros((64, 64), np.uint16)
        for number, (y, x, r) in enumerate(nuclei, start=1):
            label[disc(label.shape, y, x, r)] = number
        stem = f"well{i + 1}"
        tifffile.imwrite(images / f"{stem}_DNA.tif",
                         np.where(label > 0, DNA_LEVEL, 100).astype(np.uint16))
        tifffile.imwrite(images / f"{stem}_Tubulin.tif",
                         np.full(label.shape, TUBULIN_LEVEL, np.uint16))
        tifffile.imwrite(masks / f"{stem}_Nuclei.tif", label)
        base = lambda folder: str(folder) if absolute else folder.name  # noqa: E731
        rows.append({
            "Metadata_Plate": "P1", "Metadata_Well": f"B0{i + 1}",
            "FileName_DNA": f"{stem}_DNA.tif", "PathName_DNA": base(images),
            "FileName_Tubulin": f"{stem}_Tubulin.tif", "PathName_Tubulin": base(images),
            "ObjectsFileName_Nuclei": f"{stem}_Nuclei.tif", "ObjectsPathName_Nuclei": base(masks),
            "Notes": "not carried",
        })
    csv = root / "load_data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, centres


def run(csv, out, **kwargs):
    options = dict(channels=["DNA", "Tubulin"], objects=["Nuclei"], modules=MODULES,
                   progress=False)
    options.update(kwargs)
    return featurize(csv, out, **options)


def test_featurize_writes_cellprofiler_csvs(tmp_path):
    csv, centres = write_experiment(tmp_path)
    out = tmp_path / "cellprofiler"
    summary = run(csv, out)
    assert summary["image_sets"] == 2 and summary["objects"] == {"Nuclei": 3}
    assert sorted(p.name for p in out.iterdir()) == ["Image.csv", "Nuclei.csv"]

    image = pd.read_csv(out / "Image.csv", dtype={"Metadata_Well": str})
    assert image["ImageNumber"].tolist() == [1, 2]
    assert image["Count_Nuclei"].tolist() == [2, 1]
    assert image["Scaling_DNA"].tolist() == [65535, 65535]
    assert image["Metadata_Well"].tolist() == ["B01", "B02"]
    assert image["FileName_DNA"].tolist() == ["well1_DNA.tif", "well2_DNA.tif"]
    assert image["ObjectsFileName_Nuclei"].tolist() == ["well1_Nuclei.tif", "well2_Nuclei.tif"]
    assert "Notes" not in image.columns
    # Relative paths are rewritten relative to the output folder, where readers look.
    assert image["PathName_DNA"].tolist() == ["../images"] * 2
    assert (out / image["PathName_DNA"][0] / image["FileName_DNA"][0]).is_file()

    nuclei = pd.read_csv(out / "Nuclei.csv")
    assert list(nuclei.columns[:4]) == ["ImageNumber", "ObjectNumber", "Location_Center_X",
                                        "Location_Center_Y"]
    assert nuclei["ImageNumber"].tolist() == [1, 1, 2]
    assert nuclei["ObjectNumber"].tolist() == [1, 2, 1]
    expected = [c for field in centres for c in field]
    assert nuclei["Location_Center_X"].tolist() == [x for _, x, _ in expected]
    assert nuclei["Location_Center_Y"].tolist() == [y for y, _, _ in expected]
    areas = [disc((64, 64), y, x, r).sum() for y, x, r in expected]
    assert nuclei["AreaShape_Area"].tolist() == areas
    np.testing.assert_allclose(nuclei["Intensity_MeanIntensity_DNA"], DNA_LEVEL / 65535, rtol=1e-7)
    np.testing.assert_allclose(nuclei["Intensity_MeanIntensity_Tubulin"], TUBULIN_LEVEL / 65535,
                               rtol=1e-7)
    assert summary["features"]["Nuclei"] == nuclei.shape[1] - 4


def test_absolute_paths_stay_absolute_and_8_bit_and_float_images_scale(tmp_path):
    csv, _ = write_experiment(tmp_path, absolute=True)
    images = tmp_path / "images"
    dna8 = tifffile.imread(images / "well1_DNA.tif") // 200  # 30000 -> 150
    tifffile.imwrite(images / "well1_DNA.tif", dna8.astype(np.uint8))
    tifffile.imwrite(images / "well1_Tubulin.tif", np.full((64, 64), 0.3, np.float32))
    out = tmp_path / "out"
    run(csv, out)
    image = pd.read_csv(out / "Image.csv")
    assert image["PathName_DNA"].tolist() == [str(images)] * 2
    assert image["Scaling_DNA"].tolist() == [255, 65535]
    assert image["Scaling_Tubulin"].tolist() == [1, 65535]
    nuclei = pd.read_csv(out / "Nuclei.csv")
    first = nuclei[nuclei["ImageNumber"] == 1]
    np.testing.assert_allclose(first["Intensity_MeanIntensity_DNA"], 150 / 255, rtol=1e-7)
    np.testing.assert_allclose(first["Intensity_MeanIntensity_Tubulin"], 0.3, rtol=1e-6)


def test_scale_image_numbers_and_empty_image_sets(tmp_path):
    csv, _ = write_experiment(tmp_path)
    table = pd.read_csv(csv)
    table.insert(0, "ImageNumber", [11, 7])
    table.to_csv(csv, index=False)
    tifffile.imwrite(tmp_path / "masks" / "well1_Nuclei.tif", np.zeros((64, 64), np.uint16))
    out = tmp_path / "out"
    summary = run(csv, out, scale=4095)
    assert summary["objects"] == {"Nuclei": 1}
    image = pd.read_csv(out / "Image.csv")
    assert image["ImageNumber"].tolist() == [11, 7]
    assert image["Count_Nuclei"].tolist() == [0, 1]
    assert image["Scaling_DNA"].tolist() == [4095, 4095]
    nuclei = pd.read_csv(out / "Nuclei.csv")
    assert nuclei["ImageNumber"].tolist() == [7]
    np.testing.assert_allclose(nuclei["Intensity_MeanIntensity_DNA"], DNA_LEVEL / 4095, rtol=1e-7)


def test_two_workers_write_the_same_files(tmp_path):
    csv, _ = write_experiment(tmp_path)
    run(csv, tmp_path / "one", workers=1)
    run(csv, tmp_path / "two", workers=2)
    for name in ["Image.csv", "Nuclei.csv"]:
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()


def test_existing_outputs_need_overwrite(tmp_path):
    csv, _ = write_experiment(tmp_path)
    out = tmp_path / "out"
    run(csv, out)
    with pytest.raises(UserInputError, match="already holds Image.csv, Nuclei.csv.*--overwrite"):
        run(csv, out)
    run(csv, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["Image.csv", "Nuclei.csv"]


@pytest.mark.parametrize("change, kwargs, message", [
    (None, {"load_data_csv": "missing.csv"}, r"LoadData CSV not found: .*missing\.csv"),
    (lambda t: t.drop(columns="PathName_Tubulin"), {}, r"no PathName_Tubulin column for "
                                                       r"channel 'Tubulin'"),
    (None, {"channels": ["DNA", "Actin"]}, r"no FileName_Actin or PathName_Actin column"),
    (None, {"objects": ["Cells"]}, r"no ObjectsFileName_Cells or ObjectsPathName_Cells column "
                                   r"for object 'Cells'"),
    (lambda t: t.assign(FileName_DNA=["well1_DNA.tif", "gone.tif"]), {},
     r"file not found: .*images/gone\.tif \(ImageNumber 2, FileName_DNA"),
    (None, {"modules": ["intensity", "hairiness"]}, r"unknown measurement module 'hairiness'"),
    (lambda t: t.assign(ImageNumber=[1, 1]), {}, r"ImageNumber column must hold distinct"),
])
def test_user_errors_name_the_file_column_or_option(tmp_path, change, kwargs, message):
    csv, _ = write_experiment(tmp_path)
    if change is not None:
        change(pd.read_csv(csv)).to_csv(csv, index=False)
    if "load_data_csv" in kwargs:
        csv = tmp_path / kwargs.pop("load_data_csv")
    with pytest.raises(UserInputError, match=message):
        run(csv, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_files_and_leaves_no_partial_output(tmp_path):
    csv, _ = write_experiment(tmp_path)
    tifffile.imwrite(tmp_path / "masks" / "well2_Nuclei.tif", np.zeros((64, 60), np.uint16))
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match=r"ImageNumber 2: .*DNA image well2_DNA\.tif is "
                                             r"64x64.*Nuclei mask well2_Nuclei\.tif is 64x60"):
        run(csv, out)
    assert list(out.iterdir()) == []


def test_cli_reports_and_turns_errors_into_one_line(tmp_path):
    from cli.main import main

    csv, _ = write_experiment(tmp_path)
    out = tmp_path / "out"
    args = ["featurize", str(csv), str(out), "--channels", "DNA,Tubulin", "--objects", "Nuclei",
            "--modules", "sizeshape,intensity", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Measured 2 image sets (3 Nuclei)" in result.output
    assert len(pd.read_csv(out / "Nuclei.csv")) == 3
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: {out} already holds Image.csv, Nuclei.csv; pass --overwrite to replace them "
        "or choose another folder."]
    assert os.path.exists(out / "Image.csv")
