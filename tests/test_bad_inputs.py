"""Every command, given what a user gets wrong: one clear line naming the file or option,
a non-zero exit, no traceback.

Each case builds its bad input from the shared small fixtures (a CellProfiler folder, the
disc dataset, its short run and exported model), copying before it damages anything, and
gives the text the error must name. Cases run in one process through click's CliRunner.
"""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli.main import main
from conftest import make_cellprofiler_folder

# fit cases stop after 2 short steps if the bad input went unnoticed.
FIT = ["--steps", "2", "--batch-size", "8", "--validate-every", "1000", "--quiet"]
CONVERT = ["--objects", "Nuclei,Cells", "--channels", "DNA,Tubulin,Actin", "--crop-size", "32",
           "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def cp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_cp")
    make_cellprofiler_folder(root)
    return root


class Context:
    """What the cases build on, and helpers that copy and damage it under `tmp`."""

    def __init__(self, cp_root, data, run, model, tmp):
        self.cp_root, self.data, self.run, self.model, self.tmp = cp_root, data, run, model, tmp

    def cp(self, mutate=None):
        root = self.tmp / "cp_copy"
        shutil.copytree(self.cp_root, root)
        if mutate:
            mutate(root / "cp", root)
        return root / "cp"

    def file(self, name="a_file"):
        path = self.tmp / name
        path.write_text("not a folder\n")
        return path

    def dataset(self, damage=None, shard="train-00000-of-00002.tfrecord"):
        """A copy of the disc dataset with `damage` done to one shard; (folder, shard path)."""
        data = self.tmp / "data"
        shutil.copytree(self.data, data)
        path = data / shard
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "delete":
            path.unlink()
        elif damage == "flip":  # same size, one byte of a record's data changed
            content = bytearray(path.read_bytes())
            content[200] ^= 0xFF
            path.write_bytes(bytes(content))
        elif damage == "replace":  # a valid shard of another size in its place
            shutil.copyfile(data / "train-00001-of-00002.tfrecord", path)
            with open(path, "ab") as handle:
                handle.write((data / "val-00000-of-00002.tfrecord").read_bytes())
        return data, path

    def manifest_edit(self, edit):
        data, _ = self.dataset()
        manifest = json.loads((data / "manifest.json").read_text())
        edit(manifest)
        (data / "manifest.json").write_text(json.dumps(manifest))
        return data

    def run_copy(self, damage=None):
        run = self.tmp / "run"
        shutil.copytree(self.run, run)
        if damage == "truncate_best":
            for path in (run / "best").glob("ckpt-*.data-*"):
                path.write_bytes(path.read_bytes()[:100])
        elif damage == "truncate_all":
            for path in run.glob("*/ckpt-*.data-*"):
                path.write_bytes(path.read_bytes()[:100])
        elif damage == "other_data":
            manifest = json.loads((run / "manifest.json").read_text())
            manifest["shards"][0]["sha256"] = "0" * 64
            (run / "manifest.json").write_text(json.dumps(manifest))
        return run

    def config(self, settings):
        path = self.tmp / "config.json"
        path.write_text(json.dumps(settings))
        return path

    def profiles(self):
        manifest = json.loads((self.data / "manifest.json").read_text())
        path = self.tmp / "profiles.csv"
        pd.DataFrame([manifest["features"]["stats"]["median"]],
                     columns=manifest["features"]["names"]).to_csv(path, index=False)
        return path


def nuclei_edit(edit):
    def mutate(cp, root):
        table = pd.read_csv(cp / "Nuclei.csv")
        table = edit(table)
        table.to_csv(cp / "Nuclei.csv", index=False)
    return mutate


def set_value(column, value):
    def edit(table):
        table[column] = table[column].astype(object)
        table.loc[2, column] = value
        return table
    return edit


def truncate_tiff(cp, root):
    tiff = sorted((root / "images" / "plate1").glob("*_DNA.tif"))[1]
    tiff.write_bytes(tiff.read_bytes()[:2000])


# (id, args builder: Context -> (args, [texts the error names])). Paths are made absolute
# strings; `{tmp}` and friends are whatever the builder returns.
CASES = [
    # sample-data
    ("sample-data out is a file",
     lambda c: (["sample-data", c.file("out"), "--cells", "20"], ["out"])),
    ("sample-data --cells 0", lambda c: (["sample-data", c.tmp / "s", "--cells", "0"], ["--cells"])),
    # convert
    ("convert input missing",
     lambda c: (["convert", c.tmp / "nowhere", c.tmp / "out", *CONVERT], ["nowhere"])),
    ("convert no Image.csv",
     lambda c: (["convert", c.tmp, c.tmp / "out", *CONVERT], ["Image.csv"])),
    ("convert Nuclei.csv non-numeric location",
     lambda c: (["convert", c.cp(nuclei_edit(set_value("Location_Center_X", "abc"))),
                 c.tmp / "out", *CONVERT], ["Nuclei.csv", "Location_Center_X", "'abc'"])),
    ("convert Nuclei.csv non-numeric ImageNumber",
     lambda c: (["convert", c.cp(nuclei_edit(set_value("ImageNumber", "x"))), c.tmp / "out",
                 *CONVERT], ["Nuclei.csv", "ImageNumber"])),
    ("convert Nuclei.csv non-numeric ObjectNumber",
     lambda c: (["convert", c.cp(nuclei_edit(set_value("ObjectNumber", "?"))), c.tmp / "out",
                 *CONVERT], ["Nuclei.csv", "ObjectNumber"])),
    ("convert Nuclei.csv header only",
     lambda c: (["convert", c.cp(nuclei_edit(lambda t: t.iloc[:0])), c.tmp / "out", *CONVERT],
                ["Nuclei.csv", "no rows"])),
    ("convert truncated TIFF",
     lambda c: (["convert", c.cp(truncate_tiff), c.tmp / "out", *CONVERT],
                ["_DNA.tif", "copy it again"])),
    ("convert out is a file",
     lambda c: (["convert", c.cp(), c.file("out"), *CONVERT], ["out"])),
    ("convert unknown --split-by",
     lambda c: (["convert", c.cp(), c.tmp / "out", *CONVERT, "--split-by", "Metadata_Nope"],
                ["Metadata_Nope"])),
    ("convert crop larger than the images",
     lambda c: (["convert", c.cp(), c.tmp / "out", "--objects", "Nuclei", "--channels", "DNA",
                 "--crop-size", "200"], ["200"])),
    ("convert unknown channel",
     lambda c: (["convert", c.cp(), c.tmp / "out", "--objects", "Nuclei", "--channels", "GFP"],
                ["GFP"])),
    # inspect
    ("inspect missing folder",
     lambda c: (["inspect", c.tmp / "nowhere"], ["nowhere", "does not exist"])),
    ("inspect a file", lambda c: (["inspect", c.file("data")], ["data", "is a file"])),
    ("inspect missing shard",
     lambda c: (["inspect", c.dataset("delete")[0]], ["train-00000-of-00002.tfrecord", "--verify"])),
    ("inspect truncated shard",
     lambda c: (["inspect", c.dataset("truncate")[0]], ["train-00000-of-00002.tfrecord"])),
    ("inspect --verify corrupt shard",
     lambda c: (["inspect", c.dataset("flip")[0], "--verify"], ["train-00000-of-00002.tfrecord"])),
    ("inspect manifest not JSON",
     lambda c: (["inspect", _broken_manifest(c)], ["manifest.json", "JSON"])),
    # featurize
    ("featurize missing LoadData CSV",
     lambda c: (["featurize", c.tmp / "load.csv", c.tmp / "out", "--channels", "DNA",
                 "--objects", "Nuclei"], ["load.csv"])),
    ("featurize LoadData CSV without rows",
     lambda c: (["featurize", _write(c.tmp / "load.csv", "ImageNumber,FileName_DNA\n"),
                 c.tmp / "out", "--channels", "DNA", "--objects", "Nuclei"], ["load.csv", "no rows"])),
    # fit
    ("fit data missing",
     lambda c: (["fit", c.tmp / "nowhere", c.tmp / "run"], ["nowhere", "does not exist"])),
    ("fit truncated train shard",
     lambda c: (["fit", c.dataset("truncate")[0], c.tmp / "run", *FIT],
                ["train-00000-of-00002.tfrecord", "inspect", "--verify"])),
    ("fit missing val shard",
     lambda c: (["fit", c.dataset("delete", "val-00001-of-00002.tfrecord")[0], c.tmp / "run",
                 *FIT],
                ["val-00001-of-00002.tfrecord", "missing"])),
    ("fit shard replaced by another",
     lambda c: (["fit", c.dataset("replace")[0], c.tmp / "run", *FIT],
                ["train-00000-of-00002.tfrecord", "replaced"])),
    ("fit --verify-data corrupt shard",
     lambda c: (["fit", c.dataset("flip")[0], c.tmp / "run", "--verify-data", *FIT],
                ["train-00000-of-00002.tfrecord", "checksum"])),
    ("fit config steps not a number",
     lambda c: (["fit", c.data, c.tmp / "run", "--config", c.config({"steps": "twenty"})],
                ["config.json", '"steps"', "whole number"])),
    ("fit config seed a fraction",
     lambda c: (["fit", c.data, c.tmp / "run", "--config", c.config({"seed": 1.5}), *FIT],
                ["config.json", '"seed"'])),
    ("fit config stratify a number",
     lambda c: (["fit", c.data, c.tmp / "run", "--config", c.config({"stratify": 1}), *FIT],
                ["config.json", '"stratify"'])),
    ("fit run dir is a file",
     lambda c: (["fit", c.data, c.file("run"), *FIT], ["run", "is a file"])),
    ("fit run of another dataset",
     lambda c: (["fit", c.data, c.run_copy("other_data"), "--steps", "14", "--batch-size", "8"],
                ["run", "--new-data"])),
    ("fit fewer steps than done",
     lambda c: (["fit", c.data, c.run_copy(), "--steps", "5"],
                ["already trained to step 36", "--steps 5"])),
    ("fit crops too small for any model",
     lambda c: (["fit", c.manifest_edit(lambda m: m["crop"].update(height=24, width=24)),
                 c.tmp / "run", *FIT], ["24 px", "--crop-size 32"])),
    ("fit crop 40 with the published model",
     lambda c: (["fit", c.manifest_edit(lambda m: m["crop"].update(height=40, width=40)),
                 c.tmp / "run", "--model", "published", *FIT],
                ["40 px", "published", "--model exemplar"])),
    ("fit no checkpoint reads",
     lambda c: (["fit", c.data, c.run_copy("truncate_all"), "--steps", "14", "--batch-size", "8"],
                ["ckpt-", "reads"])),
    ("fit --peer-timeout 0",
     lambda c: (["fit", c.data, c.tmp / "run", "--peer-timeout", "0"], ["--peer-timeout"])),
    # export
    ("export run missing",
     lambda c: (["export", c.tmp / "nowhere", c.tmp / "models"], ["nowhere", "does not exist"])),
    ("export run is a file",
     lambda c: (["export", c.file("run"), c.tmp / "models"], ["run", "is a file"])),
    ("export truncated checkpoint",
     lambda c: (["export", c.run_copy("truncate_best"), c.tmp / "models"],
                ["ckpt-36", "--checkpoint latest"])),
    ("export model base is a file",
     lambda c: (["export", c.run, c.file("models")], ["models"])),
    ("export --version 0",
     lambda c: (["export", c.run, c.tmp / "models", "--version", "0"], ["--version"])),
    # generate
    ("generate missing model",
     lambda c: (["generate", c.tmp / "nowhere", c.tmp / "out", "--treatment-mean", "all",
                 "--data", c.data], ["nowhere"])),
    ("generate --data truncated shard",
     lambda c: (["generate", c.model, c.tmp / "out", "--treatment-mean", "all", "--data",
                 c.dataset("truncate")[0]], ["train-00000-of-00002.tfrecord", "--verify"])),
    ("generate --data corrupt shard",
     lambda c: (["generate", c.model, c.tmp / "out", "--treatment-mean", "all", "--data",
                 c.dataset("flip")[0]], ["train-00000-of-00002.tfrecord", "--verify"])),
    ("generate --data missing",
     lambda c: (["generate", c.model, c.tmp / "out", "--treatment-mean", "all", "--data",
                 c.tmp / "nowhere"], ["nowhere", "does not exist"])),
    ("generate profiles missing",
     lambda c: (["generate", c.model, c.tmp / "none.csv", c.tmp / "out"], ["none.csv"])),
    ("generate out is a file",
     lambda c: (["generate", c.model, c.profiles(), c.file("out")], ["out"])),
    # traverse
    ("traverse unknown feature",
     lambda c: (["traverse", c.model, c.tmp / "out", "--feature", "Nuclei_Nope"], ["Nuclei_Nope"])),
    ("traverse --data missing shard",
     lambda c: (["traverse", c.model, c.tmp / "out", "--feature", "Nuclei_AreaShape_Area",
                 "--correlated", "--data", c.dataset("delete")[0]],
                ["train-00000-of-00002.tfrecord"])),
    # predict
    ("predict server unreachable",
     lambda c: (["predict", c.profiles(), c.tmp / "out", "--server", "http://127.0.0.1:9",
                 "--model-name", "m"], ["http://127.0.0.1:9"])),
    # evaluate
    ("evaluate truncated shard",
     lambda c: (["evaluate", c.model, c.dataset("truncate")[0], c.tmp / "ev", "--quiet"],
                ["train-00000-of-00002.tfrecord", "--verify"])),
    ("evaluate corrupt shard",
     lambda c: (["evaluate", c.model, c.dataset("flip", "test-00000-of-00002.tfrecord")[0],
                 c.tmp / "ev", "--quiet", "--max-cells", "8", "--reference-cells", "8",
                 "--train-cells", "8"], ["test-00000-of-00002.tfrecord", "--verify"])),
    ("evaluate model missing",
     lambda c: (["evaluate", c.tmp / "nowhere", c.data, c.tmp / "ev"], ["nowhere"])),
    ("evaluate out is a file",
     lambda c: (["evaluate", c.model, c.data, c.file("ev")], ["ev"])),
    # explore
    ("explore --data truncated shard",
     lambda c: (["explore", c.model, "--data", c.dataset("truncate")[0], "--port", "0"],
                ["train-00000-of-00002.tfrecord", "--verify"])),
    ("explore --data corrupt shard",
     lambda c: (["explore", c.model, "--data", c.dataset("flip")[0], "--port", "0"],
                ["train-00000-of-00002.tfrecord", "--verify"])),
    ("explore model missing",
     lambda c: (["explore", c.tmp / "nowhere", "--port", "0"], ["nowhere"])),
]


def _write(path, text):
    path.write_text(text)
    return path


def _broken_manifest(c):
    data, _ = c.dataset()
    (data / "manifest.json").write_text('{"schema_version": 1,')
    return data


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_bad_input_is_one_clear_line(build, cp_root, disc_dataset, disc_run, disc_model, tmp_path,
                                     monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    context = Context(cp_root, disc_dataset, disc_run, disc_model, tmp_path)
    args, needles = build(context)
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    assert result.exit_code != 0, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_the_table_covers_every_command_with_forty_cases():
    commands = {name.split()[0] for name, _ in CASES}
    assert commands == set(main.commands), set(main.commands) ^ commands
    assert len(CASES) >= 40


# ---------------------------------------------------------------------------
# Bad data never becomes a dataset: convert's cases that need no trained model. Each asserts
# the one line, the exit code, and that nothing half-written is left in OUT_DIR or beside it.


def repeat_row(table_name, source_row, at_row):
    """A copy of one row of an object table inserted again (an image set exported twice)."""
    def mutate(cp, root):
        table = pd.read_csv(cp / table_name)
        table = pd.concat([table.iloc[:at_row], table.iloc[source_row:source_row + 1],
                           table.iloc[at_row:]])
        table.to_csv(cp / table_name, index=False)
    return mutate


def same_object_number(cp, root):
    """Two different nuclei of ImageNumber 2 given one ObjectNumber."""
    table = pd.read_csv(cp / "Nuclei.csv")
    rows = table.index[table["ImageNumber"] == 2]
    table.loc[rows[3], "ObjectNumber"] = table.loc[rows[1], "ObjectNumber"]
    table.to_csv(cp / "Nuclei.csv", index=False)


def retype_tiff(dtype, field=1, channel="DNA"):
    """One field's image of `channel` saved again as `dtype` (another microscope's export)."""
    def mutate(cp, root):
        import numpy as np
        import tifffile

        tiff = sorted((root / "images" / "plate1").glob(f"*_{channel}.tif"))[field]
        pixels = tifffile.imread(tiff)
        tifffile.imwrite(tiff, (pixels / 65535).astype(dtype))
    return mutate


def held_lock(c):
    """OUT_DIR's convert lock held by a live process of this host (another convert)."""
    import os
    import socket

    (c.tmp / ".out.convert.lock").write_text(f"{os.getppid()}@{socket.gethostname()}\n")
    return c.cp()


DATA_CASES = [
    ("duplicate row in the first object table",
     lambda c: (["convert", c.cp(repeat_row("Nuclei.csv", 10, 11)), c.tmp / "out", *CONVERT],
                ["Nuclei.csv", "ImageNumber 2, ObjectNumber 5 is listed twice", "rows 12 and 13"])),
    ("one ObjectNumber for two nuclei of one image",
     lambda c: (["convert", c.cp(same_object_number), c.tmp / "out", *CONVERT],
                ["Nuclei.csv", "ImageNumber 2, ObjectNumber 2 is listed twice", "rows 9 and 11"])),
    ("duplicate row in the first table across chunks",
     lambda c: (["convert", c.cp(repeat_row("Nuclei.csv", 13, 16)), c.tmp / "out", *CONVERT,
                 "--chunk-rows", "3"],
                ["Nuclei.csv", "ImageNumber 3, ObjectNumber 2 is listed twice", "rows 15 and 18"])),
    ("duplicate row in a later object table",
     lambda c: (["convert", c.cp(repeat_row("Cells.csv", 20, 21)), c.tmp / "out", *CONVERT],
                ["Cells.csv", "ImageNumber 4, ObjectNumber 3 is listed twice"])),
    ("a channel of 16-bit and float images",
     lambda c: (["convert", c.cp(retype_tiff("float32")), c.tmp / "out", *CONVERT],
                ["channel DNA", "uint16", "float32", "ImageNumber 2", "one kind"])),
    ("--measured-as a channel paired with another's own image",
     lambda c: (["convert", c.cp(), c.tmp / "out", *CONVERT, "--measured-as", "DNA=Actin"],
                ["--measured-as", "DNA and Actin", "Actin"])),
    ("--measured-as every channel none",
     lambda c: (["convert", c.cp(), c.tmp / "out", *CONVERT, "--measured-as",
                 "DNA=none,Tubulin=none,Actin=none"], ["--measured-as DNA=none", "DNA"])),
    ("--measured-as none for the only channel of other images",
     lambda c: (["convert", c.cp(lambda cp, root: _rename_measured(cp, "DNA", "CorrBlue")),
                 c.tmp / "out", "--objects", "Nuclei", "--channels", "DNA", "--crop-size", "32",
                 "--measured-as", "DNA=none", "--quiet"],
                ["no channel is paired", "CorrBlue", "--exclude"])),
    ("OUT_DIR inside a file",
     lambda c: (["convert", c.cp(), c.file("a_file") / "out", *CONVERT],
                ["a_file", "cannot be made", "a folder you can write to"])),
    ("another convert writing into OUT_DIR",
     lambda c: (["convert", held_lock(c), c.tmp / "out", *CONVERT, "--overwrite"],
                [str(c.tmp / "out"), "is converting into this folder now", "Wait for it"])),
]


def _rename_measured(cp, old, new):
    table = pd.read_csv(cp / "Nuclei.csv")
    table.columns = [col.replace(f"_{old}", f"_{new}") for col in table.columns]
    table.to_csv(cp / "Nuclei.csv", index=False)


def leftovers(tmp):
    """What a failed convert into tmp/out left: hidden files beside OUT_DIR other than a lock
    the case itself holds, and any dataset file inside it."""
    beside = [p.name for p in tmp.glob(".out*") if p.name != ".out.convert.lock"]
    inside = [p.name for p in (tmp / "out").rglob("*")] if (tmp / "out").exists() else []
    return beside + inside


@pytest.mark.parametrize("build", [b for _, b in DATA_CASES], ids=[i for i, _ in DATA_CASES])
def test_bad_data_never_becomes_a_dataset(build, cp_root, tmp_path):
    context = Context(cp_root, None, None, None, tmp_path)
    args, needles = build(context)
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert leftovers(tmp_path) == []
