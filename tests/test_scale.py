"""Scaling out: Dask (LocalCluster on 127.0.0.1), --part/--finalize, resilience, merged statistics.

Every way of running must give the same dataset as one process: shards record for record, the
manifest but for its timing fields, featurize's CSVs byte for byte.
"""
import json
import os
import re
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from conftest import CHANNELS, make_cellprofiler_folder
from tfrecords_tools import parts as distributed
from tfrecords_tools.convert import (ConvertConfig, adopt_plan, build_tasks, convert,
                                     load_or_plan, write_part)
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.features import (feature_statistics, part_moments, sorted_part_values,
                                      statistics_from_parts)
from tfrecords_tools.manifest import load_manifest
from tfrecords_tools.records import decode_example, iterate_records

RUN_FIELDS = ("created", "seconds", "command")  # what may differ between runs of one job


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes on 127.0.0.1 and a client of it."""
    from distributed import Client, LocalCluster

    with LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        yield local, client


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample screen (drawn and measured), small."""
    from cp2image_tf.sampledata import make_sample_data

    root = tmp_path_factory.mktemp("sample") / "sample"
    make_sample_data(root, cells=200, seed=3, workers=1, progress=False)
    return root


def sample_config(sample, out, **kw):
    base = dict(input=str(sample / "cellprofiler"), out_dir=str(out), channels=list(CHANNELS),
                objects=["Nuclei", "Cells"], crop_size=32, shard_size=12)
    base.update(kw)
    return ConvertConfig(**base)


def records_of(out):
    """The manifest and every record, shard by shard, in order."""
    m = load_manifest(out)
    shape = (m["crop"]["height"], m["crop"]["width"], m["crop"]["channels"])
    shards = {}
    for shard in m["shards"]:
        shards[shard["file"]] = [
            decode_example(raw, m["features"]["count"], shape, m["crop"]["dtype"])
            for raw in iterate_records(str(out / shard["file"]), m["compression"])]
    return m, shards


def assert_same_dataset(a, b):
    """Shards identical record for record, manifests identical but for run fields."""
    ma, ra = records_of(a)
    mb, rb = records_of(b)
    for m in (ma, mb):
        for key in RUN_FIELDS:
            m.pop(key)
        m["config"].pop("out_dir")
    assert ma == mb
    assert list(ra) == list(rb)
    for name in ra:
        assert len(ra[name]) == len(rb[name]) > 0
        for x, y in zip(ra[name], rb[name]):
            assert x["cell_id"] == y["cell_id"] and x["treatment"] == y["treatment"]
            np.testing.assert_array_equal(x["crop"], y["crop"])
            np.testing.assert_array_equal(x["features"], y["features"])  # NaN == NaN here
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "rejects.csv").read_bytes() == (b / "rejects.csv").read_bytes()
    assert not (a / ".parts").exists() and not (b / ".parts").exists()


# ---------------------------------------------------------------------------------------------
# Statistics merged from parts


def test_statistics_merged_from_parts_equal_feature_statistics():
    rng = np.random.default_rng(0)
    values = (rng.lognormal(3, 2, (801, 6)) * rng.choice([-1, 1], (801, 6))).astype(np.float32)
    values[rng.random(values.shape) < 0.15] = np.nan
    values[::9, 1] = np.inf
    values[:, 4] = np.nan
    values[7, 4] = 2.5  # one finite value
    cuts = [0, 1, 90, 91, 400, 801]
    parts = [values[a:b] for a, b in zip(cuts, cuts[1:])]
    want = feature_statistics(values)
    got = statistics_from_parts([part_moments(p) for p in parts],
                                [sorted_part_values(p) for p in parts], 6, memory_bytes=2048)
    for key in ("median", "mad", "finite_count", "min", "max"):  # exact
        assert got[key] == want[key], key
    for key in ("mean", "std"):  # Chan's merge: equal to rounding
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_convert_statistics_come_from_parts_and_equal_direct_ones(cp_folder, tmp_path):
    out = tmp_path / "out"
    m = convert(ConvertConfig(input=str(cp_folder), out_dir=str(out), channels=list(CHANNELS),
                              objects=["Nuclei", "Cells"], crop_size=32, shard_size=5),
                progress=False)
    _, shards = records_of(out)
    split = {s["file"]: s["split"] for s in m["shards"]}
    train = np.stack([r["features"] for name, recs in shards.items() if split[name] == "train"
                      for r in recs])
    assert sum(1 for s in m["shards"] if s["split"] == "train") > 3  # merged from several parts
    want, got = feature_statistics(train), m["features"]["stats"]
    for key in ("median", "mad", "finite_count", "min", "max"):
        assert got[key] == want[key], key
    for key in ("mean", "std"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Dask: the same dataset


def test_local_cluster_convert_equals_single_process(sample, cluster, tmp_path):
    from cli.main import main

    single = tmp_path / "single"
    convert(sample_config(sample, single), progress=False)
    # The CLI's own LocalCluster of two worker processes (planned 7 rows at a time: chunks that
    # split image sets) ...
    local = tmp_path / "local"
    args = ["convert", str(sample / "cellprofiler"), str(local), "--channels", ",".join(CHANNELS),
            "--objects", "Nuclei,Cells", "--crop-size", "32", "--shard-size", "12",
            "--scheduler", "local", "--workers", "2", "--chunk-rows", "7"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "dashboard http://127.0.0.1:" in result.output
    assert_same_dataset(single, local)
    # ... and a running scheduler, by address.
    remote = tmp_path / "remote"
    convert(sample_config(sample, remote, scheduler=cluster[0].scheduler_address, chunk_rows=5),
            progress=False)
    assert_same_dataset(single, remote)
    assert len(load_manifest(single)["shards"]) > 4


def test_local_cluster_featurize_writes_the_same_bytes(sample, cluster, tmp_path):
    from cp2image_tf.measuring.featurize import featurize

    options = dict(channels=list(CHANNELS), objects=["Nuclei", "Cells"],
                   modules=["sizeshape", "intensity"], progress=False)
    csv = sample / "load_data.csv"
    one = featurize(csv, tmp_path / "one", part_size=1000, **options)  # one part: as before
    featurize(csv, tmp_path / "dask", part_size=2, scheduler=cluster[0].scheduler_address,
              **options)
    assert one["image_sets"] > 4 and one["objects"]["Nuclei"] > 100
    for name in ("Image.csv", "Nuclei.csv", "Cells.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == [
        "Cells.csv", "Image.csv", "Nuclei.csv"]
    # The CLI's --part over 3 parts, then --finalize: the same bytes too; a missing part is named.
    from cli.main import main

    args = ["featurize", str(csv), str(tmp_path / "parts"), "--channels", ",".join(CHANNELS),
            "--objects", "Nuclei,Cells", "--modules", "sizeshape,intensity", "--part-size", "2",
            "--quiet"]
    for i in (1, 3):
        result = CliRunner().invoke(main, args + ["--part", f"{i}/3"])
        assert result.exit_code == 0 and f"Part {i}/3:" in result.output, result.output
    result = CliRunner().invoke(main, args + ["--finalize"])
    assert result.exit_code == 1, result.output
    assert re.search(r"part 2/3 \(part-\d+-of-\d+\) is not complete", result.output)
    assert CliRunner().invoke(main, args + ["--part", "2/3"]).exit_code == 0
    result = CliRunner().invoke(main, args + ["--finalize"])
    assert result.exit_code == 0 and "Measured" in result.output, result.output
    for name in ("Image.csv", "Nuclei.csv", "Cells.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()


def test_remeasure_on_dask_equals_one_process(cluster):
    from cp2image_tf.measuring import remeasure as rm

    yy, xx = np.mgrid[:40, :40]
    crops = []
    for k in range(6):
        nucleus = (yy - 20) ** 2 + (xx - 20) ** 2 <= (5 + k) ** 2
        cell = (yy - 20) ** 2 + (xx - 21) ** 2 <= (11 + k) ** 2
        crops.append(np.stack([np.where(nucleus, 0.8, 0.05), np.where(cell, 0.5, 0.04)], -1))
    crops = np.asarray(crops)
    plan = rm.plan_measurement(["Nuclei_AreaShape_Area", "Cells_AreaShape_Area",
                    "Cells_Intensity_MeanIntensity_Actin"], ["DNA", "Actin"])
    one = rm.remeasure(crops, plan, ["DNA", "Actin"], chunk=2)
    dask = rm.remeasure(crops, plan, ["DNA", "Actin"], chunk=2, client=cluster[1])
    pd.testing.assert_frame_equal(one, dask)
    assert one["Nuclei_AreaShape_Area"].notna().all()


# ---------------------------------------------------------------------------------------------
# Resilience: kill -9 of a worker mid-run


def test_worker_killed_mid_run_is_rerun_and_result_identical(tmp_path):
    from distributed import Client, LocalCluster

    cp_dir = make_cellprofiler_folder(tmp_path / "in", n_fields=20, cells_per_field=4)
    config = dict(input=str(cp_dir), channels=list(CHANNELS), objects=["Nuclei", "Cells"],
                  crop_size=32, shard_size=4)
    single = tmp_path / "single"
    convert(ConvertConfig(out_dir=str(single), **config), progress=False)
    total = len(load_manifest(single)["shards"])
    assert total >= 12

    out = tmp_path / "dask"
    killed = {}
    # Slow parts (a test hook: each part sleeps first), so the kill lands mid-run.
    with LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0",
                      env={"CP2IMAGE_TF_PART_DELAY": "0.4"}) as local, Client(local) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        def kill_when_two_parts_are_done():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = len(list((out / ".parts").glob("*.json"))) if out.exists() else 0
                if done >= 2:
                    os.kill(victim, signal.SIGKILL)
                    killed["parts_done"] = done
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_two_parts_are_done)
        killer.start()
        convert(ConvertConfig(out_dir=str(out), scheduler=local.scheduler_address, **config),
                progress=False)
        killer.join()
        client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
        assert victim not in client.run(os.getpid).values()
    assert killed and killed["parts_done"] < total  # killed while parts were still to run
    assert_same_dataset(single, out)


# ---------------------------------------------------------------------------------------------
# Without Dask: --part I/N, then --finalize


def cli_convert(cp_dir, out, *extra):
    from cli.main import main

    args = ["convert", str(cp_dir), str(out), "--channels", ",".join(CHANNELS), "--objects",
            "Nuclei,Cells", "--crop-size", "32", "--shard-size", "5", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def test_parts_then_finalize_equal_single_process(cp_folder, tmp_path):
    single = tmp_path / "single"
    assert cli_convert(cp_folder, single).exit_code == 0
    out = tmp_path / "parts"
    for i in (3, 1, 2):  # any order, as an array runs them
        result = cli_convert(cp_folder, out, "--part", f"{i}/3")
        assert result.exit_code == 0, result.output
        assert f"Part {i}/3:" in result.output and "--finalize" in result.output
        assert not (out / "manifest.json").exists()
    result = cli_convert(cp_folder, out, "--finalize")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Wrote 47 cells")
    assert_same_dataset(single, out)


def test_finalize_names_a_missing_or_corrupt_part(cp_folder, tmp_path):
    out = tmp_path / "out"
    for i in (1, 3):
        assert cli_convert(cp_folder, out, "--part", f"{i}/3").exit_code == 0
    result = cli_convert(cp_folder, out, "--finalize")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "part 2/3 is not complete" in lines[0] and "--part 2/3" in lines[0]
    assert not (out / "manifest.json").exists()

    assert cli_convert(cp_folder, out, "--part", "2/3").exit_code == 0
    shards = sorted(out.glob("*.tfrecord"))
    victim = shards[-1]  # the last shard: in part 3 of 3
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = cli_convert(cp_folder, out, "--finalize")
    assert result.exit_code == 1
    line = result.output.strip()
    assert "part 3/3" in line and victim.name in line and "corrupt" in line
    # Re-running the part redoes the corrupt shard only (verified by checksum, not by name).
    untouched = {p.name: p.stat().st_mtime_ns for p in shards if p != victim}
    assert cli_convert(cp_folder, out, "--part", "3/3").exit_code == 0
    assert cli_convert(cp_folder, out, "--finalize").exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != victim} == untouched
    single = tmp_path / "single"
    assert cli_convert(cp_folder, single).exit_code == 0
    assert_same_dataset(single, out)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit


@pytest.mark.parametrize("part, message", [
    ("4/3", "--part 4/3: I must be between 1 and 3"),
    ("0/3", "--part 0/3: I must be between 1 and 3"),
    ("2", "--part 2: write I/N"),
])
def test_bad_part_is_a_one_line_error(cp_folder, tmp_path, part, message):
    result = cli_convert(cp_folder, tmp_path / "out", "--part", part)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {result.output.strip()[7:]}"]
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_unreachable_scheduler_is_a_one_line_error_naming_it(cp_folder, tmp_path):
    import socket

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    result = cli_convert(cp_folder, tmp_path / "out", "--scheduler", address)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: --scheduler {address}: no Dask scheduler answered "
                               f"within {distributed.CONNECT_TIMEOUT} s")
    with pytest.raises(UserInputError, match="--workers 2 with --scheduler tcp://"):
        distributed.check_options(address, 2)


def test_input_a_worker_cannot_read_is_a_one_line_error_naming_it(cp_folder, cluster, tmp_path):
    # The image header is fine (the driver plans with it), its pixels are cut off: only the
    # worker that reads the pixels finds out, and its UserInputError reaches the CLI as such.
    image = sorted((cp_folder.parent / "images" / "plate1").glob("*_s2_Actin.tif"))[0]
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])
    result = cli_convert(cp_folder, tmp_path / "out", "--scheduler",
                         cluster[0].scheduler_address)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {image}: cannot be read as an image")
    # A file gone when the worker looks (e.g. not on its file system): named, as UserInputError.
    image.write_bytes(data)
    config = ConvertConfig(input=str(cp_folder), out_dir=str(tmp_path / "o2"),
                           channels=list(CHANNELS), crop_size=32, shard_size=5)
    plan, plan_dir = load_or_plan(config, tmp_path / "o2", False)
    (tmp_path / "o2" / ".parts").mkdir(parents=True)
    tasks = build_tasks(plan, adopt_plan(plan_dir, tmp_path / "o2"), config, tmp_path / "o2")
    missing = tasks[0]["fields"][0]["paths"][1]
    os.rename(missing, missing + ".away")
    with pytest.raises(UserInputError, match=f"{missing}: cannot be read here .*shared file"):
        list(distributed.run_parts(write_part, tasks[:1], ["t0"], cells=len,
                                   client=cluster[1], progress=False))


def test_part_selection_covers_every_item_once():
    items = list(range(10))
    parts = [distributed.select_part(items, (i, 3)) for i in (1, 2, 3)]
    assert sum(parts, []) == items and all(parts)
    for i, part in enumerate(parts, start=1):
        assert all(distributed.part_of(items.index(x), 10, 3) == i for x in part)
    assert distributed.select_part(items, (5, 12)) == [3]
    with pytest.raises(UserInputError, match="--part and --finalize"):
        distributed.check_options(None, 1, (1, 2), True)
