"""TensorFlow's harmless C++ lines are kept from the user around the calls that print them
(cp2image_tf/tflog.py); every other line still shows."""
import json
import os
import subprocess
import sys

from cp2image_tf.tflog import HARMLESS, quiet_first_call, without_harmless_lines


def test_only_the_known_harmless_lines_are_dropped_and_the_rest_kept_in_order(capfd):
    with without_harmless_lines():
        os.write(2, f"E0000 00:00:1.0 1 util.cc:131] {HARMLESS[0]}. Falling back.\n".encode())
        os.write(2, b"W0000 a warning the user should see\n")
        os.write(2, f"E0000 meta_optimizer.cc:967] {HARMLESS[1]}: fanout 'x'\n".encode())
        os.write(2, b"another line\n")
    os.write(2, f"{HARMLESS[0]} outside the block\n".encode())
    err = capfd.readouterr().err
    assert err == ("W0000 a warning the user should see\nanother line\n"
                   f"{HARMLESS[0]} outside the block\n")


def test_only_the_first_call_is_filtered(capfd):
    def speak(n):
        os.write(2, f"{HARMLESS[1]} {n}\n".encode())
        return n

    quiet = quiet_first_call(speak)
    assert quiet(1) == 1 and quiet(2) == 2
    assert capfd.readouterr().err == f"{HARMLESS[1]} 2\n"


def test_fit_and_export_print_no_tensorflow_error_line(disc_dataset, tmp_path):
    """A short exemplar fit (measurer, decoder steps, one judge round) and its export, as a user
    runs them: no line of TensorFlow's C++ errors (E0000 ...) on standard error."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"measurer": {"steps": 4},
                                  "judge": {"rounds": 1, "every": 2, "cells": 16, "steps": 2}}))
    run, model = tmp_path / "run", tmp_path / "model"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    for args in (["fit", str(disc_dataset), str(run), "--steps", "4", "--batch-size", "8",
                  "--validate-every", "2", "--checkpoint-every", "2", "--config", str(config),
                  "--quiet"],
                 ["export", str(run), str(model)]):
        done = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True,
                              text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert done.returncode == 0, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("E0000")]
        assert errors == [], errors
        if args[0] == "fit":  # the exemplar model's edit strength, calibrated after the steps
            default = json.loads((run / "calibration.json").read_text())["default"]
            assert f"the rest {default:.2f}" in done.stdout
