"""fit: learning, distribution strategies, kill-and-resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import free_ports
from click.testing import CliRunner

from cli.main import main
from cp2image_tf.training.checkpoints import checkpoint_paths, checkpoint_step
from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.train import fit
from tfrecords_tools.errors import UserInputError

SMALL = dict(batch_size=8, log_every=1, validate_every=3, checkpoint_every=3, val_cells=64,
             grid_cells=4)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_short_run_learns_and_writes_its_outputs(disc_dataset, tmp_path):
    run = tmp_path / "run"
    summary = fit(disc_dataset, run, FitConfig(model="published", steps=120, batch_size=16, log_every=10,
                                               validate_every=60, checkpoint_every=60,
                                               val_cells=64, grid_cells=4), progress=False)
    # Well below the mean training image: the decoder draws each cell's own disc.
    assert summary["val_mse"] < 0.5 * summary["baseline_mse"], summary
    history = pd.read_csv(run / "history.csv")
    assert list(history["step"]) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
    assert history["val_mse"].notna().sum() == 3
    assert {"pixel", "discriminator", "feature1", "weight1", "images_per_s"} <= set(history.columns)
    assert (run / "samples" / "latest.png").stat().st_size > 1000
    assert json.loads((run / "best" / "best.json").read_text())["step"] in (60, 120)
    assert json.loads((run / "config.json").read_text())["steps"] == 120
    assert any((run / "logs").iterdir())


MIRRORED = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.published.trainer import PublishedTrainer as Trainer
from tfrecords_tools.manifest import load_manifest

manifest = load_manifest(sys.argv[1])
config = FitConfig(model="published", batch_size=8,
                   published={"perceptual_delay": 1, "perceptual_slope": 1})
rng = np.random.default_rng(0)
F = manifest["features"]["count"]
features = rng.normal(size=(3, 8, F)).astype("float32")
target = rng.uniform(size=(3, 8, 48, 48, 2)).astype("float32")
real = rng.uniform(size=(3, 8, 48, 48, 2)).astype("float32")

def run(strategy):
    keras.utils.set_random_seed(1)
    trainer = Trainer(manifest, config, strategy)
    step = trainer.train_step_fn()
    t = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((features, target))))
    r = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((features, real))))
    return [[float(v) for v in step(t, r).values()] for _ in range(3)]

one = run(tf.distribute.get_strategy())
two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print("LOSSES", np.asarray(one).tolist(), np.asarray(two).tolist())
"""


def test_mirrored_over_two_devices_matches_one_device(disc_dataset):
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(disc_dataset)], capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("LOSSES")][0]
    one, two = (np.asarray(x) for x in json.loads("[" + line[len("LOSSES "):].replace("] [", "], [") + "]"))
    # Same global batch and seed: the same loss terms (pixel, perceptual, discriminator) at
    # every step, with the perceptual terms switched on from step 2.
    np.testing.assert_allclose(one, two, rtol=2e-3)


WORKER = """
import json, sys
from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.train import fit
summary = fit(sys.argv[1], sys.argv[2], FitConfig(steps=4, strategy="multiworker", batch_size=8,
              log_every=1, validate_every=2, checkpoint_every=2, val_cells=32, grid_cells=2),
              progress=False)
print("DIGEST", summary["weights_sha256"], summary["steps"])
"""



def test_multiworker_two_processes_end_with_identical_weights(disc_dataset, tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(disc_dataset),
                                       str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            outputs.append([l for l in out.splitlines() if l.startswith("DIGEST")][0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert outputs[0] == outputs[1] and outputs[0].endswith(" 4")
    # Only the chief writes; the other worker's scratch checkpoints are gone.
    assert (tmp_path / "run" / "checkpoints" / "checkpoint").is_file()
    assert not list((tmp_path / "run").glob(".worker-*"))
    assert (tmp_path / "run" / "history.csv").is_file()


def test_killed_run_resumes_from_its_last_checkpoint(disc_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["-m", "cli", "fit", str(disc_dataset), str(run), "--model", "published", "--batch-size", "8",
            "--checkpoint-every", "2", "--validate-every", "1000", "--log-every", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, *args, "--steps", "1000"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The kill comes once the checkpoint state file records step 4, read as resume reads it
    # (a checkpoint whose files are written but which the state file does not list yet is
    # not one to resume from).
    def newest_recorded():
        paths = checkpoint_paths(run / "checkpoints")
        return checkpoint_step(paths[0]) if paths else 0

    deadline = time.time() + 600
    try:
        while time.time() < deadline and newest_recorded() < 4:
            assert proc.poll() is None, "fit exited before its 4th step"
            time.sleep(0.2)
        assert newest_recorded() >= 4
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = newest_recorded()
    assert saved >= 4
    result = subprocess.run([sys.executable, *args[:-1], "--steps", str(saved + 2)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from step {saved}" in result.stderr
    history = pd.read_csv(run / "history.csv")
    assert history["step"].max() == saved + 2
    assert history["step"].is_unique


def test_bad_input_is_one_clear_line(disc_dataset, tmp_path, monkeypatch):
    runner = CliRunner()

    def one_line(args, *needles):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        lines = [l for l in result.output.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        for needle in needles:
            assert needle in lines[0], lines[0]

    one_line(["fit", tmp_path / "nothing", tmp_path / "run"], "nothing", "does not exist")
    result = runner.invoke(main, ["fit", str(disc_dataset), str(tmp_path / "run"), "--strategy", "ring"])
    assert result.exit_code == 2 and "Invalid value for '--strategy': 'ring'" in result.output
    with pytest.raises(UserInputError, match="--strategy ring"):
        FitConfig(strategy="ring").validate()
    one_line(["fit", disc_dataset, tmp_path / "run", "--steps", "0"], "--steps")
    config = tmp_path / "config.json"
    config.write_text('{"stepz": 3}')
    one_line(["fit", disc_dataset, tmp_path / "run", "--config", config], "stepz")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    one_line(["fit", disc_dataset, tmp_path / "run"], "TF_CONFIG")
    monkeypatch.delenv("TF_CONFIG")
    # A run folder trained on other data.
    run = tmp_path / "other"
    run.mkdir()
    manifest = json.loads((disc_dataset / "manifest.json").read_text())
    manifest["features"]["names"] = manifest["features"]["names"][:1]
    (run / "manifest.json").write_text(json.dumps(manifest))
    one_line(["fit", disc_dataset, run], str(run), "other data", "new RUN_DIR")
    with pytest.raises(UserInputError, match="crop"):
        manifest = json.loads((disc_dataset / "manifest.json").read_text())
        manifest["crop"]["height"] = 68
        (run / "manifest.json").write_text(json.dumps(manifest))
        fit(disc_dataset, run, FitConfig(steps=1))


def test_noise_input_trains_and_generates_several_cells(disc_dataset):
    import tensorflow as tf

    from cp2image_tf.training.published.trainer import PublishedTrainer as Trainer
    from tfrecords_tools.manifest import load_manifest

    manifest = load_manifest(disc_dataset)
    trainer = Trainer(manifest, FitConfig(model="published", batch_size=4, noise_dim=3,
                                          published={"jit_compile": False}),
                      tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 4, manifest["features"]["count"])).astype("float32")
    crops = rng.uniform(size=(2, 4, 48, 48, 2)).astype("float32")
    it = iter(tf.data.Dataset.from_tensor_slices((features, crops)))
    step = trainer.train_step_fn()
    first = float(step(it, iter(tf.data.Dataset.from_tensor_slices((features, crops))))["pixel"])
    assert np.isfinite(first) and int(trainer.step.numpy()) == 1
    same_profile = np.repeat(features[0][:1], 2, axis=0)
    a, b = trainer.generate(same_profile).numpy()
    assert not np.allclose(a, b)  # one profile, two plausible cells
