"""Interrupted fits lose nothing: resume continues the same run, skips a checkpoint that does
not read, SIGTERM saves one; a missing multiworker peer is an error after --peer-timeout."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_ports

from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.train import fit

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
# The disc_run fixture's settings (tests/conftest.py).
DISC_RUN = dict(steps=36, batch_size=8, validate_every=18, checkpoint_every=18, val_cells=32,
                grid_cells=0)


def checkpoint_values(prefix):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "elapsed" not in name and "save_counter" not in name}


def test_resume_skips_an_unreadable_checkpoint_and_ends_as_the_uninterrupted_run(
        disc_dataset, disc_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(disc_run, run)
    # The run "was interrupted" while writing its last checkpoint: ckpt-36 is cut short.
    data = run / "checkpoints" / "ckpt-36.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    summary = fit(disc_dataset, run, FitConfig(**DISC_RUN), progress=False)
    err = capsys.readouterr().err
    assert f"Skipping checkpoint {run / 'checkpoints' / 'ckpt-36'}" in err
    assert "Resuming from step 18" in err
    assert summary["start_step"] == 18 and summary["steps"] == 36
    resumed = checkpoint_values(run / "checkpoints" / "ckpt-36")
    uninterrupted = checkpoint_values(disc_run / "checkpoints" / "ckpt-36")
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not np.array_equal(resumed[k], uninterrupted[k])]
    assert not differ, differ[:5]


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(disc_dataset, tmp_path, monkeypatch):
    """SIGTERM (timeout, Slurm, Kubernetes) during training: a checkpoint at the step reached,
    one line, exit status 143; the rerun resumes there."""
    from click.testing import CliRunner

    from cli.main import main
    from cp2image_tf.training.published.trainer import PublishedTrainer

    make_step = PublishedTrainer.train_step_fn

    def signalling_step_fn(self):
        step_fn = make_step(self)

        def step(*iterators):
            losses = step_fn(*iterators)
            if int(self.step.numpy()) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return losses
        return step

    monkeypatch.setattr(PublishedTrainer, "train_step_fn", signalling_step_fn)
    run = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"jit_compile": False, "val_cells": 16, "grid_cells": 0}))
    args = ["fit", str(disc_dataset), str(run), "--model", "published", "--batch-size", "8",
            "--steps", "1000", "--checkpoint-every", "500", "--validate-every", "500", "--quiet",
            "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 143, result.output
    assert "Traceback" not in result.output
    assert f"stopped by SIGTERM at step 3; checkpoint {run / 'checkpoints' / 'ckpt-3'}" in result.output
    assert (run / "checkpoints" / "ckpt-3.index").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is fit's only
    monkeypatch.setattr(PublishedTrainer, "train_step_fn", make_step)
    result = CliRunner().invoke(main, args[:7] + ["--steps", "4"] + args[9:])
    assert result.exit_code == 0, result.output
    assert "Resuming from step 3" in result.output  # said under --quiet too


def test_a_missing_peer_is_an_error_after_the_peer_timeout(tmp_path):
    from cp2image_tf.training.strategy import wait_for_peers
    from tfrecords_tools.errors import UserInputError

    ports = free_ports(2)
    spec = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": 0},
            "workers": [f"127.0.0.1:{p}" for p in ports]}
    started = time.monotonic()
    with pytest.raises(UserInputError, match=rf"127.0.0.1:{ports[1]} did not answer within 1 s "
                                             r"\(--peer-timeout\)"):
        wait_for_peers(spec, timeout=1.0, poll=0.2)
    assert time.monotonic() - started < 5


def test_fit_waiting_for_a_missing_peer_stops_on_sigterm(disc_dataset, tmp_path):
    ports = free_ports(2)
    env = {**ENV, "TF_CONFIG": json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": 0}})}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "fit", str(disc_dataset),
                             str(tmp_path / "run"), "--model", "published", "--steps", "2",
                             "--peer-timeout", "600"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while "Waiting up to 600 s (--peer-timeout)" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "fit ended before waiting for its peer"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM before its first checkpoint" in err


def test_fewer_steps_than_done_leave_the_run_as_it_was_and_unbalanced_batches_warn(
        disc_dataset, disc_run, tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    run = tmp_path / "run"
    shutil.copytree(disc_run, run)
    before = {name: (run / name).read_bytes() for name in ("config.json", "manifest.json",
                                                          "history.csv")}
    # 2 treatments, batches of 1: they cannot hold both.
    result = CliRunner().invoke(main, ["fit", str(disc_dataset), str(run), "--steps", "5",
                                       "--batch-size", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Warning: --batch-size 1 is smaller than the 2 treatments" in result.output
    assert "already trained to step 36, so --steps 5 leaves nothing to do" in result.output
    assert "nan" not in result.output
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_run_continues_on_new_data_only_when_told(disc_dataset, disc_run, tmp_path):
    from tfrecords_tools.errors import UserInputError
    from cp2image_tf.training.run_folder import check_run_dir

    run = tmp_path / "run"
    shutil.copytree(disc_run, run)
    manifest = json.loads((disc_dataset / "manifest.json").read_text())
    config = FitConfig(**DISC_RUN)
    check_run_dir(run, manifest, config)  # the same dataset: resumes
    other = json.loads(json.dumps(manifest))
    other["shards"][1]["sha256"] = "f" * 64  # same shape, another convert's shard
    with pytest.raises(UserInputError, match="another dataset of the same shape.*--new-data"):
        check_run_dir(run, other, config)
    check_run_dir(run, other, config, new_data=True)


def test_a_checkpoint_of_other_shapes_is_refused_with_one_message(tmp_path):
    """A run folder written by another version (a variable of another shape) names the
    checkpoint and what to do, instead of TensorFlow's shape traceback."""
    import tensorflow as tf

    from cp2image_tf.training.checkpoints import restore_matching
    from tfrecords_tools.errors import UserInputError

    old = tf.train.Checkpoint(bank=tf.Variable(tf.ones([5, 3])))
    path = old.save(str(tmp_path / "ckpt"))
    same = tf.train.Checkpoint(bank=tf.Variable(tf.zeros([5, 3])))
    restore_matching(same, path)
    np.testing.assert_array_equal(same.bank.numpy(), np.ones([5, 3]))
    with pytest.raises(UserInputError, match=r"ckpt-1: this checkpoint does not fit .*another version"):
        restore_matching(tf.train.Checkpoint(bank=tf.Variable(tf.zeros([3, 5]))), path)


def test_a_run_dir_given_relative_to_the_working_folder_resumes(tmp_path, monkeypatch):
    """`cp2image-tf fit DATA run` twice in one folder: the second finds the first's checkpoints
    (TensorFlow joins the state file's entries with the folder; it must not be joined twice)."""
    import tensorflow as tf

    from cp2image_tf.training.checkpoints import checkpoint_paths, newest_readable

    folder = tmp_path / "run" / "checkpoints"
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(folder), 3)
    for step in (18, 36):
        manager.save(checkpoint_number=step)
    monkeypatch.chdir(tmp_path)
    expected = [str(folder / "ckpt-36"), str(folder / "ckpt-18")]
    assert checkpoint_paths("run/checkpoints") == expected
    assert newest_readable("run/checkpoints") == (expected[0], [])
