"""The convert and inspect commands as a user runs them, bad input included."""
import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from cli.main import main

ARGS = ["--channels", "DNA,Tubulin,Actin", "--objects", "Nuclei,Cells", "--crop-size", "32",
        "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_convert_then_inspect_verify(cp_folder, tmp_path):
    out = tmp_path / "out"
    result = run("convert", cp_folder, out, *ARGS)
    assert result.exit_code == 0, result.output
    assert "Wrote 47 cells" in result.output and "1 cells rejected" in result.output
    result = run("inspect", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "cells: 47" in result.output and "verify: every shard matches" in result.output


def test_inspect_names_a_corrupt_shard(cp_folder, tmp_path):
    out = tmp_path / "out"
    assert run("convert", cp_folder, out, *ARGS).exit_code == 0
    shard = sorted(out.glob("train-*.tfrecord"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run("inspect", out, "--verify")
    assert result.exit_code != 0
    assert shard.name in result.output and "checksum" in result.output


def test_missing_image_csv(tmp_path):
    (tmp_path / "cp").mkdir()
    one_line_error(run("convert", tmp_path / "cp", tmp_path / "out", *ARGS), "no Image.csv")


def test_missing_object_table(cp_folder, tmp_path):
    (cp_folder / "Cells.csv").unlink()
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS), "'Cells'", "--objects")


def test_unknown_object_name(cp_folder, tmp_path):
    result = run("convert", cp_folder, tmp_path / "out", "--channels", "DNA", "--objects", "Nucleus")
    one_line_error(result, "'Nucleus'", "Nuclei", "--objects")


def test_missing_channel_columns(cp_folder, tmp_path):
    result = run("convert", cp_folder, tmp_path / "out", "--channels", "DNA,Mito", "--quiet")
    one_line_error(result, "Image.csv", "FileName_Mito", "--channels")


def test_missing_image_file(cp_folder, tmp_path):
    victim = sorted((cp_folder.parent / "images" / "plate1").glob("*_Actin.tif"))[2]
    victim.unlink()
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS), victim.name, "not found")


def test_non_numeric_feature_column(cp_folder, tmp_path):
    nuclei = pd.read_csv(cp_folder / "Nuclei.csv")
    nuclei["AreaShape_Area"] = nuclei["AreaShape_Area"].astype(object)
    nuclei.loc[4, "AreaShape_Area"] = "#DIV/0!"
    nuclei.to_csv(cp_folder / "Nuclei.csv", index=False)
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS),
                   "Nuclei_AreaShape_Area", "not numeric", "--exclude")


def test_empty_feature_selection(cp_folder, tmp_path):
    result = run("convert", cp_folder, tmp_path / "out", *ARGS, "--include", "^Zernike")
    one_line_error(result, "no feature columns left", "--include")


def test_crop_larger_than_images(cp_folder, tmp_path):
    result = run("convert", cp_folder, tmp_path / "out", "--channels", "DNA", "--crop-size", "200")
    one_line_error(result, "--crop-size 200", "96x96")


def test_inconsistent_channel_sizes(cp_folder, tmp_path):
    victim = sorted((cp_folder.parent / "images" / "plate1").glob("*_Tubulin.tif"))[0]
    tifffile.imwrite(victim, np.zeros((80, 96), dtype=np.uint16))
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS), "differ in size", victim.name)


def test_existing_output_needs_overwrite(cp_folder, tmp_path):
    out = tmp_path / "out"
    assert run("convert", cp_folder, out, *ARGS).exit_code == 0
    one_line_error(run("convert", cp_folder, out, *ARGS), str(out), "--overwrite")
    assert run("convert", cp_folder, out, *ARGS, "--overwrite").exit_code == 0


def test_unrelated_non_empty_output(cp_folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    one_line_error(run("convert", cp_folder, out, *ARGS), "not empty")
    assert (out / "notes.txt").read_text() == "keep me"


def test_inspect_incomplete_dataset(tmp_path):
    one_line_error(run("inspect", tmp_path), "manifest.json", "convert")


def test_bad_split_fractions(cp_folder, tmp_path):
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS, "--split", "0.5,0.5"),
                   "--split")


def test_unknown_split_by_column(cp_folder, tmp_path):
    one_line_error(run("convert", cp_folder, tmp_path / "out", *ARGS, "--split-by", "Metadata_Row"),
                   "--split-by", "Metadata_Row", "Metadata_Well")


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_help_does_not_import_tensorflow(command):
    """--help and argument errors must not pay TensorFlow's start-up."""
    import subprocess
    import sys

    code = ("import sys; from cli.main import main\n"
            f"try: main(['{command}', '--help'])\n"
            "except SystemExit: pass\n"
            "print('TF-LOADED' if 'tensorflow' in sys.modules else 'TF-NOT-LOADED')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Usage:" in result.stdout
    assert result.stdout.strip().endswith("TF-NOT-LOADED")


def test_tensorflow_startup_noise_is_held_back_and_the_rest_passes(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, re\n"
        "from cli.common import _STARTUP_NOISE, _filtered_stderr\n"
        "with _filtered_stderr(_STARTUP_NOISE):\n"
        "    os.write(2, b'I0000 00:00:1 1 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
        "    os.write(2, b'E0000 00:00:1 1 cuda_platform.cc:52] failed call to cuInit: CUDA error\\n')\n"
        "    os.write(2, b'I0000 00:00:1 1 port.cc:153] oneDNN custom operations are on. You may "
        "see slightly different numerical results\\n')\n"
        "    os.write(2, b'a real problem\\n')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    assert result.stderr == "a real problem\n"
