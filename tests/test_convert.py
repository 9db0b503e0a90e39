"""convert: round trip against a direct computation, splits, selection, rejects, safety."""
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import CHANNELS, make_cellprofiler_folder
from tfrecords_tools import convert as convert_module
from tfrecords_tools.convert import ConvertConfig, convert, cut_crop
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.inspection import verify
from tfrecords_tools.manifest import load_manifest
from tfrecords_tools.records import decode_example, iterate_records


def config_for(cp_dir, out, **kw):
    base = dict(input=str(cp_dir), out_dir=str(out), channels=list(CHANNELS),
                objects=["Nuclei", "Cells"], crop_size=32, shard_size=10)
    base.update(kw)
    return ConvertConfig(**base)


def read_all(out):
    m = load_manifest(out)
    shape = (m["crop"]["height"], m["crop"]["width"], m["crop"]["channels"])
    records = {}
    for shard in m["shards"]:
        for raw in iterate_records(str(out / shard["file"]), m["compression"]):
            rec = decode_example(raw, m["features"]["count"], shape, m["crop"]["dtype"])
            rec["split"] = shard["split"]
            records[rec["cell_id"]] = rec
    return m, records


def test_round_trip_equals_direct_computation(cp_folder, tmp_path):
    out = tmp_path / "out"
    manifest = convert(config_for(cp_folder, out), progress=False)
    m, records = read_all(out)
    image = pd.read_csv(cp_folder / "Image.csv").set_index("ImageNumber")
    nuclei = pd.read_csv(cp_folder / "Nuclei.csv")
    cells = pd.read_csv(cp_folder / "Cells.csv")
    assert m == manifest
    assert len(records) == len(nuclei) - 1  # the cell 5 px from the border is rejected
    for row in nuclei.itertuples():
        cell_id = f"{row.ImageNumber}-{row.ObjectNumber}"
        if row.ImageNumber == 1 and row.ObjectNumber == 1:
            assert cell_id not in records
            continue
        rec = records[cell_id]
        # Crop: the TIFF pixels around round(y), round(x), computed independently here.
        yc, xc = int(np.floor(row.Location_Center_Y + 0.5)), int(np.floor(row.Location_Center_X + 0.5))
        planes = [tifffile.imread(cp_folder / image.loc[row.ImageNumber, f"PathName_{ch}"]
                                  / image.loc[row.ImageNumber, f"FileName_{ch}"]) for ch in CHANNELS]
        expected = np.stack(planes, -1)[yc - 16:yc + 16, xc - 16:xc + 16]
        assert rec["crop"].dtype == np.uint16
        np.testing.assert_array_equal(rec["crop"], expected)
        # Features: raw values, by name, NaN kept.
        cell_row = cells[(cells.ImageNumber == row.ImageNumber) & (cells.ObjectNumber == row.ObjectNumber)].iloc[0]
        want = {"Nuclei_AreaShape_Area": row.AreaShape_Area,
                "Nuclei_Intensity_MeanIntensity_DNA": row.Intensity_MeanIntensity_DNA,
                "Nuclei_Texture_Contrast_DNA_3_00_256": row.Texture_Contrast_DNA_3_00_256,
                "Cells_AreaShape_Area": cell_row.AreaShape_Area,
                "Cells_Intensity_MeanIntensity_Actin": cell_row.Intensity_MeanIntensity_Actin}
        got = dict(zip(m["features"]["names"], rec["features"]))
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], np.float32(value), equal_nan=True)
        assert rec["treatment"] == image.loc[row.ImageNumber, "Metadata_Treatment"]
        assert rec["group"] == str(row.ImageNumber)
    assert verify(out) == []


def test_feature_selection_and_statistics(cp_folder, tmp_path):
    m = convert(config_for(cp_folder, tmp_path / "out"), progress=False)
    names = m["features"]["names"]
    # Positions, identifiers, parents/children never become features; order is fixed.
    assert names == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA",
                     "Nuclei_Texture_Contrast_DNA_3_00_256", "Cells_AreaShape_Area",
                     "Cells_Intensity_MeanIntensity_Actin"]
    dropped = {d["name"]: d["reason"] for d in m["features"]["dropped"]}
    assert "constant" in dropped["Nuclei_AreaShape_EulerNumber"]
    assert "no finite value" in dropped["Nuclei_Correlation_Costes_DNA_Actin"]
    # Statistics are the training split's, NaN ignored.
    _, records = read_all(tmp_path / "out")
    train = np.stack([r["features"] for r in records.values() if r["split"] == "train"]).astype(np.float64)
    stats = m["features"]["stats"]
    np.testing.assert_allclose(stats["mean"], np.nanmean(train, 0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.nanstd(train, 0), rtol=1e-6)
    np.testing.assert_allclose(stats["median"], np.nanmedian(train, 0), rtol=1e-6)
    mad = np.nanmedian(np.abs(train - np.nanmedian(train, 0)), 0)
    np.testing.assert_allclose(stats["mad"], mad, rtol=1e-6)


def test_include_exclude_and_features_file(cp_folder, tmp_path):
    m = convert(config_for(cp_folder, tmp_path / "a", include="^Nuclei_", exclude="Texture"),
                progress=False)
    assert m["features"]["names"] == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]
    reasons = {d["name"]: d["reason"] for d in m["features"]["dropped"]}
    assert reasons["Cells_AreaShape_Area"] == "not matched by --include"
    assert reasons["Nuclei_Texture_Contrast_DNA_3_00_256"] == "matched by --exclude"
    listed = tmp_path / "features.txt"
    listed.write_text("Cells_AreaShape_Area\nNuclei_AreaShape_Area\n")
    m = convert(config_for(cp_folder, tmp_path / "b", features_file=str(listed)), progress=False)
    assert m["features"]["names"] == ["Cells_AreaShape_Area", "Nuclei_AreaShape_Area"]


def test_split_by_group_never_leaks(tmp_path):
    cp_dir = make_cellprofiler_folder(tmp_path, n_fields=20, cells_per_field=3,
                                      treatments=("A", "B", "C", "D"))
    m = convert(config_for(cp_dir, tmp_path / "out", split_by=["Metadata_Well"], seed=3),
                progress=False)
    _, records = read_all(tmp_path / "out")
    split_of_group = {}
    for rec in records.values():
        assert split_of_group.setdefault(rec["group"], rec["split"]) == rec["split"]
    # Treatments A and B have 3 wells each: one of each is a test well.
    assert m["split"]["groups"] == {"train": 7, "val": 1, "test": 2}
    assert sum(m["counts"]["splits"].values()) == len(records) == 59
    # Shards hold one treatment each; counts per treatment add up.
    for shard in m["shards"]:
        assert shard["treatment"] in m["treatments"]["names"]
    per_split = {s: sum(m["counts"]["treatments"][s].values()) for s in ("train", "val", "test")}
    assert per_split == m["counts"]["splits"]
    # Another seed gives another, equally leak-free split.
    m2 = convert(config_for(cp_dir, tmp_path / "out2", split_by=["Metadata_Well"], seed=4),
                 progress=False)
    assert m2["counts"]["splits"] != m["counts"]["splits"] or m2["shards"] != m["shards"]


def test_edge_pad_keeps_border_cells_with_zeros(cp_folder, tmp_path):
    convert(config_for(cp_folder, tmp_path / "out", edge="pad"), progress=False)
    m, records = read_all(tmp_path / "out")
    assert m["counts"]["rejected"] == 0
    crop = records["1-1"]["crop"]  # centred 5 px from the left border: 11 columns outside
    assert np.all(crop[:, :11] == 0) and np.any(crop[:, 11:] > 0)


def test_cut_crop_rounds_half_up_and_pads():
    stack = np.arange(100, dtype=np.uint16).reshape(10, 10, 1)
    np.testing.assert_array_equal(cut_crop(stack, 4.5, 4.49, 4, "skip")[..., 0],
                                  stack[2:6, 3:7, 0])
    assert cut_crop(stack, 0.0, 5.0, 4, "skip") is None
    padded = cut_crop(stack, 0.0, 5.0, 4, "pad")[..., 0]
    np.testing.assert_array_equal(padded[:, :2], 0)
    np.testing.assert_array_equal(padded[:, 2:], stack[3:7, 0:2, 0])


def test_rejects_are_listed_never_silently_dropped(cp_folder, tmp_path):
    cells = pd.read_csv(cp_folder / "Cells.csv")
    cells = cells[~((cells.ImageNumber == 2) & (cells.ObjectNumber == 3))]
    cells.to_csv(cp_folder / "Cells.csv", index=False)
    out = tmp_path / "out"
    m = convert(config_for(cp_folder, out), progress=False)
    rejects = pd.read_csv(out / "rejects.csv")
    assert sorted(rejects.cell_id) == ["1-1", "2-3"]
    assert set(rejects.reason) == {"no Cells object with this ObjectNumber",
                                   "within 16 px of the image border (--edge skip)"}
    assert m["counts"]["cells"] + m["counts"]["rejected"] == 48


def test_absolute_paths_parquet_free_column_order(tmp_path):
    cp_dir = make_cellprofiler_folder(tmp_path, absolute_paths=True, seed=5)
    m = convert(config_for(cp_dir, tmp_path / "out"), progress=False)
    assert m["counts"]["cells"] == 47
    image_files = [f for f in m["source"]["files"] if f["path"].endswith(".tif")]
    assert len(image_files) == 8 * 3 and all(len(f["sha256"]) == 64 for f in image_files)


def test_dataset_intensity_range_is_training_percentile(cp_folder, tmp_path):
    m = convert(config_for(cp_folder, tmp_path / "out", intensity_percentile=50), progress=False)
    _, records = read_all(tmp_path / "out")
    train = np.stack([r["crop"] for r in records.values() if r["split"] == "train"])
    for c, ch in enumerate(CHANNELS):
        pixels = np.sort(train[..., c].ravel())
        expected = pixels[int(np.ceil(0.5 * pixels.size)) - 1]
        assert m["intensity"][ch]["high"] == expected
        assert m["intensity"][ch]["max"] == pixels[-1]


def test_existing_dataset_needs_overwrite(cp_folder, tmp_path):
    out = tmp_path / "out"
    convert(config_for(cp_folder, out), progress=False)
    with pytest.raises(UserInputError, match="--overwrite"):
        convert(config_for(cp_folder, out), progress=False)
    m = convert(config_for(cp_folder, out, overwrite=True, crop_size=24), progress=False)
    assert m["crop"]["height"] == 24 and verify(out) == []


def test_interrupted_convert_leaves_no_dataset_and_resumes(cp_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = convert_module.write_part
    calls = {"n": 0}

    def dies_on_third(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(task)

    monkeypatch.setattr(convert_module, "write_part", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(config_for(cp_folder, out), progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserInputError, match="re-run the same convert"):
        load_manifest(out)
    # A half-written shard from a killed process is under a temporary name only.
    (out / ".train-00002-of-00004.tfrecord.partial").write_bytes(b"garbage")
    monkeypatch.setattr(convert_module, "write_part", real)
    done_before = sorted(p.name for p in out.glob("*.tfrecord"))
    assert len(done_before) == 2
    before = {p: (out / p).read_bytes() for p in done_before}
    m = convert(config_for(cp_folder, out), progress=True)
    assert "Resuming: 2 of" in capsys.readouterr().err
    assert verify(out) == []
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    # Same bytes as an uninterrupted run.
    fresh = convert(config_for(cp_folder, tmp_path / "fresh"), progress=False)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in fresh["shards"]]


def test_parallel_workers_give_identical_shards(cp_folder, tmp_path):
    one = convert(config_for(cp_folder, tmp_path / "one"), progress=False)
    two = convert(config_for(cp_folder, tmp_path / "two", workers=2), progress=False)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["intensity"] == two["intensity"]


def test_table_input_with_crop_files(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    crops = {}
    for i in range(30):
        crop = rng.integers(0, 4000, (3, 40, 40), dtype=np.uint16)  # CHW on disk
        name = f"crops/cell{i}.npy" if i % 2 else f"crops/cell{i}.tif"
        (tmp_path / "crops").mkdir(exist_ok=True)
        if name.endswith(".npy"):
            np.save(tmp_path / name, crop)
        else:
            tifffile.imwrite(tmp_path / name, crop, photometric="minisblack")
        crops[i] = crop
        rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"A{i % 6:02d}",
                     "Metadata_ImageNumber": i // 3 + 1, "Metadata_ObjectNumber": i % 3 + 1,
                     "Metadata_Compound": "X" if i % 2 else "Y", "Metadata_CropFile": name,
                     "Nuclei_AreaShape_Area": float(rng.uniform(1, 2)),
                     "Cells_Intensity_MeanIntensity_DNA": float(rng.uniform(1, 2)),
                     "Nuclei_Location_Center_X": 1.0})
    table = pd.DataFrame(rows)
    table.to_parquet(tmp_path / "cells.parquet")
    out = tmp_path / "out"
    m = convert(ConvertConfig(input=str(tmp_path / "cells.parquet"), out_dir=str(out),
                              channels=["DNA", "RNA", "AGP"], table=True, crop_size=32),
                progress=False)
    assert m["features"]["names"] == ["Cells_Intensity_MeanIntensity_DNA", "Nuclei_AreaShape_Area"]
    assert m["treatments"]["columns"] == ["Metadata_Compound"]
    assert m["split"]["by"] == ["Metadata_ImageNumber"]
    _, records = read_all(out)
    assert len(records) == 30
    for i, crop in crops.items():
        rec = records[f"{i // 3 + 1}-{i % 3 + 1}"]
        np.testing.assert_array_equal(rec["crop"], np.moveaxis(crop, 0, -1)[4:36, 4:36])
        assert rec["treatment"] == ("X" if i % 2 else "Y")


def test_manifest_is_json_with_command_and_sources(cp_folder, tmp_path):
    convert(config_for(cp_folder, tmp_path / "out"), progress=False, command=["cp2image-tf", "convert"])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["command"] == ["cp2image-tf", "convert"]
    assert {f["path"] for f in m["source"]["files"]} >= {"Image.csv", "Nuclei.csv", "Cells.csv"}
    assert sum(s["records"] for s in m["shards"]) == m["counts"]["cells"]
    assert not (tmp_path / "out" / ".parts").exists()
    # Metadata columns with one value per treatment are kept (evaluate's --moa-column);
    # wells and sites vary within a treatment, so they are not.
    assert m["treatments"]["metadata"] == {"Metadata_Plate": {"DMSO": "plate1", "Taxol": "plate1"}}


def test_split_keeps_every_treatment_in_every_split_when_groups_allow(tmp_path):
    cp_dir = make_cellprofiler_folder(tmp_path, n_fields=48, cells_per_field=2, edge_cell=False,
                                      treatments=("A", "B", "C", "D"))
    m = convert(config_for(cp_dir, tmp_path / "out", split_by=["Metadata_Well"]), progress=False)
    # 6 wells per treatment: 4 / 1 / 1 for each, never a well on two sides.
    for split in ("train", "val", "test"):
        assert all(m["counts"]["treatments"][split][t] > 0 for t in "ABCD"), split
    assert m["split"]["groups"] == {"train": 16, "val": 4, "test": 4}
    _, records = read_all(tmp_path / "out")
    split_of_group = {}
    for rec in records.values():
        assert split_of_group.setdefault(rec["group"], rec["split"]) == rec["split"]


def test_split_keeps_a_dose_series_in_test(tmp_path):
    # 4 wells per dose (as BBBC013's dose series): 10% of 4 wells is less than half a well, yet
    # every dose gets a test well and a val well; with 3 wells, a test well only.
    doses = [f"dose{k}" for k in range(5)]
    cp_dir = make_cellprofiler_folder(tmp_path, n_fields=40, cells_per_field=2, edge_cell=False,
                                      treatments=doses)
    m = convert(config_for(cp_dir, tmp_path / "out", split_by=["Metadata_Well"]), progress=False)
    for split in ("train", "val", "test"):
        assert all(m["counts"]["treatments"][split][t] > 0 for t in doses), split
    assert m["split"]["groups"] == {"train": 10, "val": 5, "test": 5}
    from tfrecords_tools.splits import assign_splits
    wells = pd.Series([f"w{k}" for k in range(6)])
    out = assign_splits(wells, (0.8, 0.1, 0.1), strata=pd.Series(["a"] * 3 + ["b"] * 3))
    # Each has a test well; val (wanted: 10% of 6 wells) borrows a training well of one.
    assert "test" in out[:3] and "test" in out[3:]
    assert sorted(out) == ["test", "test", "train", "train", "train", "val"]


def test_illumination_correction_crops_what_cellprofiler_measured(cp_folder, tmp_path):
    image_csv = cp_folder / "Image.csv"
    table = pd.read_csv(image_csv)
    illum = np.linspace(1.0, 2.0, 96 * 96).reshape(96, 96)
    np.save(tmp_path / "illum.npy", illum)
    table["PathName_IllumDNA"] = str(tmp_path)
    table["Scaling_DNA"] = 65535.0
    table.to_csv(image_csv, index=False)
    out = tmp_path / "out"
    plain = convert(config_for(cp_folder, tmp_path / "plain"), progress=False)
    m = convert(config_for(cp_folder, out, illum="DNA=IllumDNA"), progress=False)
    assert m["crop"]["dtype"] == "float32" and m["crop"]["dtype_max"] == 1.0
    assert m["cellprofiler"]["illumination"] == {"DNA": "IllumDNA"}
    assert m["cellprofiler"]["thresholds"]["Nuclei"]["median"] == pytest.approx(0.01)
    assert m["measured_as"] == {"DNA": "DNA", "Actin": "Actin"}  # Tubulin has no features
    _, corrected = read_all(out)
    _, raw = read_all(tmp_path / "plain")
    assert plain["crop"]["dtype"] == "uint16" and corrected.keys() == raw.keys()
    nuclei = pd.read_csv(cp_folder / "Nuclei.csv")
    for cell_id, rec in list(corrected.items())[:5]:
        image, obj = map(int, cell_id.split("-"))
        row = nuclei[(nuclei.ImageNumber == image) & (nuclei.ObjectNumber == obj)].iloc[0]
        top = int(np.floor(row.Location_Center_Y + 0.5)) - 16
        left = int(np.floor(row.Location_Center_X + 0.5)) - 16
        function = illum[top:top + 32, left:left + 32]
        expected = raw[cell_id]["crop"].astype(np.float64) / 65535
        np.testing.assert_allclose(rec["crop"][..., 0], expected[..., 0] / function, rtol=1e-6)
        np.testing.assert_allclose(rec["crop"][..., 1:], expected[..., 1:], rtol=1e-6)


def test_illumination_errors_name_the_option(cp_folder, tmp_path):
    with pytest.raises(UserInputError, match="--illum DNA=IllumGFP: .*Image.csv has no "
                                             "FileName_IllumGFP.*IllumDNA"):
        convert(config_for(cp_folder, tmp_path / "a", illum="DNA=IllumGFP"), progress=False)
    with pytest.raises(UserInputError, match="/nowhere/illum.npy: illumination function not found"):
        convert(config_for(cp_folder, tmp_path / "b", illum="DNA=IllumDNA"), progress=False)
    with pytest.raises(UserInputError, match="--illum: GFP is not one of --channels"):
        convert(config_for(cp_folder, tmp_path / "c", illum="GFP=IllumDNA"), progress=False)


def test_features_measured_on_other_images_pair_by_name_or_by_option(cp_folder, tmp_path):
    from tfrecords_tools.measured import measured_images, pair_channels

    columns = ["Nuclei_Intensity_MeanIntensity_CorrDNA", "Cells_Granularity_3_CorrActin",
               "Nuclei_Texture_Contrast_CorrDNA_3_00_256", "Nuclei_AreaShape_Area",
               "Nuclei_Location_CenterMassIntensity_X_CorrDNA"]
    assert measured_images(columns) == ["CorrDNA", "CorrActin"]
    # JUMP's OrigDNA -> CorrDNA pairs by name; a channel without features stays out.
    assert pair_channels(["OrigDNA", "OrigActin", "OrigRNA"], ["CorrDNA", "CorrActin"], None,
                         "x") == {"OrigDNA": "CorrDNA", "OrigActin": "CorrActin"}
    with pytest.raises(UserInputError, match="measured on CorrGreen, CorrBlue.*--measured-as "
                                             "rawGFP=NAME,rawDNA=NAME"):
        pair_channels(["rawGFP", "rawDNA"], ["CorrGreen", "CorrBlue"], None, "x")
    assert pair_channels(["rawGFP", "rawDNA"], ["CorrGreen", "CorrBlue"],
                         {"rawGFP": "CorrGreen", "rawDNA": "CorrBlue"}, "x") == \
        {"rawGFP": "CorrGreen", "rawDNA": "CorrBlue"}
    with pytest.raises(UserInputError, match="--measured-as: no feature of x is measured on Blue"):
        pair_channels(["rawDNA"], ["CorrBlue"], {"rawDNA": "Blue"}, "x")
    # A channel without features (brightfield) is said so with =none.
    assert pair_channels(["OrigDNA", "Brightfield"], ["CorrDNA", "CorrMito"],
                         {"Brightfield": "none"}, "x") == {"OrigDNA": "CorrDNA"}
    with pytest.raises(UserInputError, match="or none for a channel without features"):
        pair_channels(["OrigDNA", "Brightfield"], ["CorrDNA", "CorrMito"], None, "x")
    # In convert: the features of Nuclei.csv named after CorrDNA, the files DNA.
    nuclei = pd.read_csv(cp_folder / "Nuclei.csv")
    nuclei.columns = [c.replace("_DNA", "_CorrDNA") for c in nuclei.columns]
    nuclei.to_csv(cp_folder / "Nuclei.csv", index=False)
    m = convert(config_for(cp_folder, tmp_path / "a"), progress=False)
    assert m["measured_as"] == {"DNA": "CorrDNA", "Actin": "Actin"}
    nuclei.columns = [c.replace("_CorrDNA", "_CorrBlue") for c in nuclei.columns]
    nuclei.to_csv(cp_folder / "Nuclei.csv", index=False)
    with pytest.raises(UserInputError, match="measured on CorrBlue, which do not pair with "
                                             "channel.s. DNA, Tubulin"):
        convert(config_for(cp_folder, tmp_path / "b"), progress=False)
    m = convert(config_for(cp_folder, tmp_path / "c", measured_as="DNA=CorrBlue"), progress=False)
    assert m["measured_as"] == {"DNA": "CorrBlue", "Actin": "Actin"}


def test_channel_labels_name_the_measured_image():
    from tfrecords_tools.manifest import channel_label, measured_names

    manifest = {"channels": ["rawGFP", "rawDNA", "Mito"],
                "measured_as": {"rawGFP": "CorrGreen", "rawDNA": "CorrBlue"}}
    assert measured_names(manifest) == ["CorrGreen", "CorrBlue", "Mito"]
    assert channel_label(manifest, "rawGFP") == "rawGFP (measured as CorrGreen)"
    assert channel_label(manifest, "Mito") == "Mito"
    assert measured_names({"channels": ["DNA"]}) == ["DNA"]  # datasets converted before the map


def test_a_channel_of_8_and_16_bit_images_is_rescaled_per_file(cp_folder, tmp_path):
    """Plates from two microscopes: CellProfiler scales each file by its own bit depth, so an
    8-bit DNA image is stored x257 (255 -> 65535) among the 16-bit ones, and the summary and
    manifest say so."""
    from click.testing import CliRunner

    from cli.main import main

    convert(config_for(cp_folder, tmp_path / "a"), progress=False)
    _, before = read_all(tmp_path / "a")
    tiff = sorted((cp_folder.parent / "images" / "plate1").glob("*_DNA.tif"))[1]  # ImageNumber 2
    tifffile.imwrite(tiff, (tifffile.imread(tiff) // 257).astype(np.uint8))
    result = CliRunner().invoke(main, ["convert", str(cp_folder), str(tmp_path / "b"),
                                       "--objects", "Nuclei,Cells", "--channels",
                                       ",".join(CHANNELS), "--crop-size", "32",
                                       "--shard-size", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("DNA: 1 of 8 fields are 8-bit images among 16-bit ones; their pixels were "
            "multiplied by 257 to the 16-bit range") in result.output
    m, after = read_all(tmp_path / "b")
    assert m["crop"]["dtype"] == "uint16"
    assert m["crop"]["rescaled"] == {"DNA": {"from": "uint8", "to": "uint16", "factor": 257,
                                             "fields": 1, "of": 8}}
    assert sorted(after) == sorted(before)
    for cell_id, rec in after.items():
        crop, old = rec["crop"], before[cell_id]["crop"]
        if rec["image_number"] == 2:
            assert np.array_equal(crop[..., 0], old[..., 0] // 257 * 257)
            assert crop[..., 0].max() > 255
            assert np.array_equal(crop[..., 1:], old[..., 1:])
        else:
            assert np.array_equal(crop, old)


def test_out_dir_in_a_folder_that_does_not_exist_yet_is_made(cp_folder, tmp_path):
    out = tmp_path / "new" / "deeper" / "data"
    m = convert(config_for(cp_folder, out), progress=False)
    assert verify(out) == [] and m["counts"]["cells"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no lock left beside it


def test_a_killed_runs_locks_and_plan_folders_are_taken_over_at_once(cp_folder, tmp_path, capsys):
    """kill -9 mid-plan leaves the locks (naming a dead process of this host) and a plan folder;
    the next run takes over without waiting and removes the dead plan, not a live one's."""
    import os
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    base = tmp_path / "w"
    base.mkdir()
    out = base / "out"
    config = config_for(cp_folder, out)
    plan_lock = convert_module.PlanLock(config, out, progress=False).path
    run_lock = base / ".out.convert.lock"
    for lock in (plan_lock, run_lock):
        lock.write_text(f"{proc.pid}@{host}\n")  # touched just now: not stale by its age
    dead = base / f".out.plan-{plan_lock.name.split('plan-')[1][:-5]}.{proc.pid}@{host}.partial"
    dead.mkdir()
    (dead / "seg-00000.values.npy").write_bytes(b"x" * 1000)
    live = base / f".out.plan-0123456789abcdef0123.{os.getppid()}@{host}.partial"
    live.mkdir()
    m = convert(config, progress=True)
    assert "Waiting" not in capsys.readouterr().err
    assert verify(out) == [] and m["counts"]["cells"] > 0
    assert sorted(p.name for p in base.iterdir()) == sorted(["out", live.name])


def test_a_waiting_run_says_whom_it_waits_for(cp_folder, tmp_path, capsys):
    import socket

    from tfrecords_tools.locks import LockFile

    lock = LockFile(tmp_path / ".x.lock")
    lock.path.write_text("4242@another-host\n")
    assert not lock.try_acquire() and lock.holder() == "process 4242 on host another-host"
    lock.path.write_text(f"1@{socket.gethostname()}\n")  # init: alive, not ours to signal
    assert not lock.try_acquire()


def test_two_overwriting_converts_at_once_leave_one_dataset_and_no_leftovers(cp_folder, tmp_path):
    """The loser of two `convert --overwrite` into one folder is told so in one line; the
    winner's dataset is whole and nothing else is left beside it."""
    import subprocess
    import sys

    out = tmp_path / "w" / "out"
    convert(config_for(cp_folder, out), progress=False)
    args = [sys.executable, "-m", "cli", "convert", str(cp_folder), str(out), "--objects",
            "Nuclei,Cells", "--channels", ",".join(CHANNELS), "--crop-size", "32",
            "--shard-size", "10", "--overwrite", "--quiet"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(300), run.stderr.read()) for run in runs]
    assert 0 in [code for code, _ in results], results
    for code, err in results:
        if code:
            assert code == 1 and "Traceback" not in err, err
            assert err.strip().splitlines()[-1].startswith(
                f"Error: {out}: process ") and "is converting into this folder now" in err
    assert verify(out) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
