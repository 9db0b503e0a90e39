"""convert's streaming planner: a few rows at a time gives what the whole table gives, holds a
bounded number of rows, and stops at a bad row or a missing image with one line, leaving nothing
that passes for complete; a rerun after the fix finishes the job.

The reference is a run whose chunk holds every row (the whole table at once). Chunks of 3-5
rows split image sets (6 cells each) across chunk boundaries, in the first table and in the
ones joined to it.
"""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import CHANNELS, make_cellprofiler_folder
from tfrecords_tools.convert import ConvertConfig, convert, plan_dataset
from tfrecords_tools.planning import Watermark
from tfrecords_tools.splits import assign_group_splits, assign_splits

WHOLE = 10 ** 6  # rows per chunk: every table in one chunk


def config_for(cp_dir, out, **kw):
    base = dict(input=str(cp_dir), out_dir=str(out), channels=list(CHANNELS),
                objects=["Nuclei", "Cells"], crop_size=32, shard_size=10,
                split_by=["Metadata_Well"])
    base.update(kw)
    return ConvertConfig(**base)


def assert_same_bytes(a, b):
    """Shards and rejects.csv byte for byte; manifests equal but for the run's time fields."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for key in ("created", "seconds", "command"):
            m.pop(key)
        m["config"].pop("out_dir")
    assert ma == mb
    names = sorted(p.name for p in a.glob("*.tfrecord"))
    assert names == sorted(p.name for p in b.glob("*.tfrecord")) and len(names) > 3
    for name in names + ["rejects.csv"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (b / ".parts").exists()


def cli(*args):
    from cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def cli_convert(cp_dir, out, *extra):
    return cli("convert", cp_dir, out, "--channels", ",".join(CHANNELS), "--objects",
               "Nuclei,Cells", "--crop-size", "32", "--shard-size", "10", "--split-by",
               "Metadata_Well", "--quiet", *extra)


@pytest.fixture
def screen(tmp_path):
    """16 fields of 6 cells; one cell per table lacks its partner, one has no treatment."""
    cp_dir = make_cellprofiler_folder(tmp_path, n_fields=16, treatments=("DMSO", "Taxol", "Nocodazole"))
    cells = pd.read_csv(cp_dir / "Cells.csv")
    cells = cells.drop(index=[40])  # a nucleus without its cell, mid-table
    cells.to_csv(cp_dir / "Cells.csv", index=False)
    image = pd.read_csv(cp_dir / "Image.csv")
    image.loc[image["ImageNumber"] == 11, "Metadata_Treatment"] = np.nan
    image.to_csv(cp_dir / "Image.csv", index=False)
    return cp_dir


def test_chunks_that_split_image_sets_give_the_whole_table_dataset(screen, tmp_path):
    nuclei = pd.read_csv(screen / "Nuclei.csv")
    starts = np.arange(0, len(nuclei), 4)
    # chunk boundaries fall inside image sets: rows on both sides share an ImageNumber
    assert (nuclei["ImageNumber"].to_numpy()[starts[1:]]
            == nuclei["ImageNumber"].to_numpy()[starts[1:] - 1]).any()
    whole = tmp_path / "whole"
    m = convert(config_for(screen, whole, chunk_rows=WHOLE), progress=False)
    assert m["rejects"]["by_reason"] == {
        "no value in Metadata_Treatment": 6, "within 16 px of the image border (--edge skip)": 1,
        "no Cells object with this ObjectNumber": 1}
    for chunk_rows in (4, 5):
        out = tmp_path / f"chunk{chunk_rows}"
        convert(config_for(screen, out, chunk_rows=chunk_rows), progress=False)
        assert_same_bytes(whole, out)
    # a process pool writing the shards of a 3-row plan
    pool = tmp_path / "pool"
    convert(config_for(screen, pool, chunk_rows=3, workers=2), progress=False)
    assert_same_bytes(whole, pool)


def test_parts_and_finalize_with_small_chunks_give_the_whole_table_dataset(screen, tmp_path):
    whole = tmp_path / "whole"
    assert cli_convert(screen, whole, "--chunk-rows", WHOLE).exit_code == 0
    out = tmp_path / "parts"
    for i in (2, 1, 3):
        result = cli_convert(screen, out, "--part", f"{i}/3", "--chunk-rows", 4)
        assert result.exit_code == 0, result.output
    plans = list((out / ".parts").glob("plan-*"))
    assert len(plans) == 1  # made by the first part, read by the others
    result = cli_convert(screen, out, "--finalize", "--chunk-rows", 5)
    assert result.exit_code == 0, result.output
    assert_same_bytes(whole, out)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_input_streams_with_the_whole_table_result(tmp_path, kind):
    rng = np.random.default_rng(2)
    (tmp_path / "crops").mkdir()
    rows = []
    for i in range(41):
        name = f"crops/c{i}.npy"
        np.save(tmp_path / name, rng.integers(0, 4000, (36, 36, 3), dtype=np.uint16))
        compound = ("X", "Y", "Z")[i % 3]
        rows.append({"Metadata_Well": f"A{i % 7:02d}", "Metadata_ImageNumber": (i * 5) % 9 + 1,
                     "Metadata_ObjectNumber": i + 1, "Metadata_Compound": compound,
                     "Metadata_MoA": "m2" if compound == "Y" else "m1",
                     # floats in a column with integers and a gap: "1.0", as pandas reads it
                     "Metadata_Dose": (1, 2.5, np.nan)[i % 3] if i != 4 else 3,
                     "Metadata_CropFile": None if i == 8 else name,
                     "Nuclei_AreaShape_Area": rng.uniform(1, 2),
                     "Cells_Intensity_MeanIntensity_DNA": rng.uniform(1, 2) if i % 4 else np.nan})
    rows[17]["Metadata_Compound"] = None
    table = pd.DataFrame(rows)
    path = tmp_path / f"cells.{kind}"
    table.to_csv(path, index=False) if kind == "csv" else table.to_parquet(path, row_group_size=7)

    def run(out, chunk_rows):
        return convert(ConvertConfig(input=str(path), out_dir=str(tmp_path / out), table=True,
                                     channels=["DNA", "RNA", "AGP"], crop_size=32, shard_size=4,
                                     split_by=["Metadata_Well"], chunk_rows=chunk_rows,
                                     treatment_column=["Metadata_Compound", "Metadata_Dose"]),
                       progress=False)

    m = run("whole", WHOLE)
    assert m["treatments"]["names"] == ["X@1.0", "Y@2.5", "Y@3.0"]
    assert m["treatments"]["metadata"]["Metadata_MoA"] == {"X@1.0": "m1", "Y@2.5": "m2",
                                                           "Y@3.0": "m2"}
    assert m["rejects"]["by_reason"] == {"no value in Metadata_Compound,Metadata_Dose": 12,
                                         "no crop file": 1}
    run("chunked", 3)
    assert_same_bytes(tmp_path / "whole", tmp_path / "chunked")


def test_planner_holds_a_bounded_number_of_rows(tmp_path):
    """Rows held at once by value: a few chunks' worth, whatever the screen's size."""
    peaks = {}
    for fields in (12, 48):
        cp_dir = make_cellprofiler_folder(tmp_path / f"s{fields}", n_fields=fields,
                                          cells_per_field=6)
        for chunk_rows in (3, WHOLE):
            work = tmp_path / f"plan{fields}-{chunk_rows}"
            work.mkdir()
            watermark = Watermark()
            plan = plan_dataset(config_for(cp_dir, tmp_path / "unused", chunk_rows=chunk_rows),
                                work, watermark=watermark)
            assert plan["counts"]["cells"] == fields * 6 - 1
            peaks[fields, chunk_rows] = watermark.peak
    # Whole tables: both tables' rows, and the second's last image set kept for a next chunk.
    assert peaks[12, WHOLE] == 2 * 72 + 6 and peaks[48, WHOLE] == 2 * 288 + 6
    # 3-row chunks: the first table's chunk, the second's rows of the (at most 2) image sets in
    # it, the rows kept for the last one and one chunk read ahead; the same at 4x the screen.
    assert peaks[12, 3] == peaks[48, 3] <= 3 + 2 * 6 + 6 + 3


def test_splits_from_group_counts_equal_splits_from_cells():
    rng = np.random.default_rng(5)
    for trial in range(30):
        groups = pd.Series(rng.integers(0, rng.integers(2, 25), 300).astype(str))
        strata = groups.map(lambda g: f"t{int(g) % rng.integers(1, 5)}") if trial % 2 else \
            pd.Series(rng.choice(["a", "b"], 300))
        fractions = [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.0, 0.5)][trial % 3]
        per_cell = assign_splits(groups, fractions, trial, strata)
        counts = groups.value_counts().to_dict()
        pairs = pd.DataFrame({"g": groups, "s": strata}).drop_duplicates()
        by_group = assign_group_splits(counts, fractions, trial,
                                       pairs.groupby("g")["s"].agg(set).to_dict())
        assert list(per_cell) == [by_group[g] for g in groups]


# ---------------------------------------------------------------------------------------------
# Bad input mid-stream: one line naming file and row (or image set), nothing complete, a rerun


def test_malformed_row_deep_in_a_table_is_named_and_a_rerun_after_the_fix_finishes(screen, tmp_path):
    whole = tmp_path / "whole"
    assert cli_convert(screen, whole, "--chunk-rows", WHOLE).exit_code == 0
    good = (screen / "Cells.csv").read_text()
    lines = good.splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    bad = lines[70].rstrip("\n").split(",")
    bad[header.index("AreaShape_Area")] = "12.5x"
    (screen / "Cells.csv").write_text("".join(lines[:70]) + ",".join(bad) + "\n"
                                      + "".join(lines[71:]))
    out = tmp_path / "out"
    result = cli_convert(screen, out, "--chunk-rows", 4)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {screen / 'Cells.csv'}: row 71, column AreaShape_Area (feature "
        "Cells_AreaShape_Area) holds '12.5x', which is not numeric; fix or remove that row, or "
        "export the table from CellProfiler again, or leave the feature out with --exclude "
        "'^Cells_AreaShape_Area$'."]
    assert not out.exists()  # no plan, no shard, no manifest
    # a row with a field too many, also deep in the table
    (screen / "Cells.csv").write_text("".join(lines[:80]) + lines[80].rstrip("\n") + ",7\n"
                                      + "".join(lines[81:]))
    result = cli_convert(screen, out, "--chunk-rows", 4)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{screen / 'Cells.csv'}: row 81 has " in result.output
    assert not out.exists()
    (screen / "Cells.csv").write_text(good)
    result = cli_convert(screen, out, "--chunk-rows", 4)
    assert result.exit_code == 0, result.output
    assert_same_bytes(whole, out)


def test_missing_image_of_one_image_set_is_named_and_a_rerun_after_the_fix_finishes(screen, tmp_path):
    whole = tmp_path / "whole"
    assert cli_convert(screen, whole, "--chunk-rows", WHOLE).exit_code == 0
    image = pd.read_csv(screen / "Image.csv").set_index("ImageNumber")
    missing = (screen / image.loc[13, "PathName_Tubulin"] / image.loc[13, "FileName_Tubulin"]).resolve()
    missing.rename(missing.with_suffix(".away"))
    out = tmp_path / "out"
    result = cli_convert(screen, out, "--chunk-rows", 4)
    assert result.exit_code == 1
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert str(missing) in line and "channel Tubulin, ImageNumber 13" in line
    assert not out.exists()
    # a part of an array job stops the same way and leaves no plan behind for the others
    result = cli_convert(screen, out, "--chunk-rows", 4, "--part", "1/2")
    assert result.exit_code == 1 and str(missing) in result.output
    assert not out.exists()
    missing.with_suffix(".away").rename(missing)
    assert cli_convert(screen, out, "--chunk-rows", 4).exit_code == 0
    assert_same_bytes(whole, out)


def test_a_table_out_of_image_set_order_is_named(screen, tmp_path):
    cells = pd.read_csv(screen / "Cells.csv")
    cells = pd.concat([cells.iloc[30:], cells.iloc[:30]])
    cells.to_csv(screen / "Cells.csv", index=False)
    result = cli_convert(screen, tmp_path / "out", "--chunk-rows", 4)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {screen / 'Cells.csv'}: row 67: ImageNumber 1 "
                                    "comes after 16; ")
    assert "Sort the table by ImageNumber" in result.output
    assert not (tmp_path / "out").exists()


def test_an_object_listed_twice_is_named(screen, tmp_path):
    cells = pd.read_csv(screen / "Cells.csv")
    cells = pd.concat([cells.iloc[:20], cells.iloc[19:20], cells.iloc[20:]])
    cells.to_csv(screen / "Cells.csv", index=False)
    result = cli_convert(screen, tmp_path / "out", "--chunk-rows", 4)
    assert result.exit_code == 1
    assert "Cells.csv: ImageNumber 4, ObjectNumber 2 is listed twice" in result.output


def test_overwrite_keeps_the_old_dataset_when_the_new_plan_fails(screen, tmp_path):
    out = tmp_path / "out"
    assert cli_convert(screen, out).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    shutil.copy(screen / "Nuclei.csv", tmp_path / "keep.csv")
    (screen / "Nuclei.csv").write_text((tmp_path / "keep.csv").read_text().replace(",", ";", 5))
    result = cli_convert(screen, out, "--overwrite")
    assert result.exit_code == 1
    assert (out / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".out.plan-*"))


def test_one_planner_per_job_others_wait_and_a_dead_ones_lock_is_taken_over(screen, tmp_path,
                                                                          monkeypatch):
    import os
    import threading
    import time

    from tfrecords_tools.convert import PlanLock

    out = tmp_path / "out"
    config = config_for(screen, out, chunk_rows=4)
    lock = PlanLock(config, out, progress=False).path
    lock.write_text("")  # another run is planning this job, and alive (it touches the lock)
    done = []
    worker = threading.Thread(target=lambda: done.append(convert(config, progress=False,
                                                                 part=(1, 2))))
    worker.start()
    time.sleep(1.5)
    assert worker.is_alive() and not done and not out.exists()  # waiting, not planning
    lock.unlink()  # that run stopped without a plan: this one plans
    worker.join(60)
    assert done and done[0]["part"] == [1, 2] and not lock.exists()
    assert convert(config, progress=False, part=(2, 2))["part"] == [2, 2]  # the plan is there
    # A lock its planner stopped touching minutes ago is stale: taken over at once.
    other = config_for(screen, tmp_path / "other", chunk_rows=4)
    stale = PlanLock(other, tmp_path / "other", progress=False).path
    stale.write_text("")
    old = time.time() - 10 * PlanLock.STALE
    os.utime(stale, (old, old))
    assert convert(other, progress=False)["counts"]["cells"] == 16 * 6 - 8
    assert not stale.exists()


def test_features_file_naming_an_image_column_is_refused(screen, tmp_path):
    names = tmp_path / "features.txt"
    names.write_text("Nuclei_AreaShape_Area\nMetadata_Site\n")
    result = cli_convert(screen, tmp_path / "out", "--features-file", names)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {names}: Metadata_Site is a column of {screen / 'Image.csv'} (one value per "
        "image set), not a measurement of an object; leave it out of the features file.")
