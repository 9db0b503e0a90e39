"""Killed generate / traverse / evaluate / export runs leave hidden partial folders; the next
run removes those of dead processes on this host, and leaves a live writer's alone."""
import os
import socket
import subprocess
import sys

from click.testing import CliRunner

from cli.main import main
from tfrecords_tools.atomic import remove_stale_partials


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def partial(parent, name, pid, host=None):
    path = parent / f".{name}.partial-{pid}@{host or socket.gethostname()}.abcd1234"
    path.mkdir(parents=True)
    (path / "cells.tif").write_bytes(b"x" * 1000)
    return path


def test_generate_and_export_remove_partials_of_dead_processes(disc_dataset, disc_run, disc_model,
                                                              tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = partial(tmp_path, "out", dead)
    running = partial(tmp_path, "out", live)
    elsewhere = partial(tmp_path, "out", dead, host="another-host")
    old_form = tmp_path / ".out.partial-k2j4h5g6"  # before names held pid and host: an hour
    old_form.mkdir()
    os.utime(old_form, (0, 0))
    result = CliRunner().invoke(main, ["generate", str(disc_model), str(tmp_path / "out"),
                                       "--treatment-mean", "all", "--data", str(disc_dataset)])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not old_form.exists()
    assert running.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial")) == \
        sorted([running.name, elsewhere.name])

    base = tmp_path / "models"
    killed = partial(base, "1", dead)
    result = CliRunner().invoke(main, ["export", str(disc_run), str(base), "--no-warmup"])
    assert result.exit_code == 0, result.output
    assert not killed.exists() and sorted(p.name for p in base.iterdir()) == ["1"]


def test_remove_stale_partials_only_touches_partial_folders(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.partial-notes.txt").write_text("a file, not a folder")
    stale = partial(tmp_path, "out", dead_pid())
    assert remove_stale_partials(tmp_path, "other") == []
    assert remove_stale_partials(tmp_path, "out") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-notes.txt", "out"]
