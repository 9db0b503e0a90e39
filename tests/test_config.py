"""FitConfig in sections: defaults per section, old flat config.json files, bad files and
out-of-range settings."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.run_folder import config_from_dict, read_config, saved_config
from tfrecords_tools.errors import UserInputError

DATA = Path(__file__).parent / "data"
# config.json files as fit wrote them before the sections (one key per setting).
FLAT = {model: DATA / name for model, name in (
    ("exemplar", "config_flat_2026-12-06.json"), ("film", "config_flat_film_2026-12-06.json"),
    ("published", "config_flat_published_2026-12-06.json"))}


def test_sections_hold_each_models_defaults_and_json_round_trips(tmp_path):
    config = config_from_dict({"model": "exemplar", "time_limit": "30m",
                               "exemplar": {"bank": 4096}, "judge": {"rounds": 2}})
    assert config.time_limit == 1800 and config.batch_size == 32
    assert config.exemplar.bank == 4096 and config.exemplar.top_k == 16
    assert config.judge_rounds == 2 and config.measurer_steps == 4 * config.steps
    assert config_from_dict({"model": "published"}).batch_size == 104
    assert FitConfig(model="published").published.decoder_lr == 0.01
    # config.json holds the run's settings and the sections its model reads.
    config.to_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written) - {f for f in FitConfig.__dataclass_fields__} == set()
    assert {"exemplar", "measurer", "judge"} <= set(written) and "published" not in written
    assert len([k for k, v in written.items() if not isinstance(v, dict)]) <= 25
    assert read_config(tmp_path / "config.json") == config
    assert "judge" not in FitConfig(model="film").to_dict()
    assert set(FitConfig(model="published").to_dict()) & {"measurer", "exemplar"} == set()


@pytest.mark.parametrize("model", sorted(FLAT))
def test_a_flat_config_written_before_the_sections_loads_as_it_was(model):
    flat = json.loads(FLAT[model].read_text())
    config = saved_config_from(FLAT[model])
    assert config.model == model and config.batch_size == flat["batch_size"]
    assert config.section.filters == flat["filters"]
    assert config.section.decoder_lr == flat["decoder_lr"]
    if model == "published":
        assert config.published.discriminator_lr == flat["discriminator_lr"]
        assert config.published.perceptual_delay == flat["perceptual_delay"]
    else:
        assert config.section.critic_lr == flat["discriminator_lr"]
        assert config.section.log_view == flat["log_view"]
        assert config.measurer_steps == flat["measurer_steps"]
    if model == "exemplar":
        assert (config.exemplar.bank, config.exemplar.top_k) == (flat["exemplars"],
                                                                 flat["exemplar_top_k"])
        assert config.exemplar.shape_weight == flat["exemplar_shape_weight"]
        assert config.judge_rounds == flat["judge_rounds"] == 3
    # Written again, it is sectioned and reads back the same.
    assert config_from_dict(config.to_dict()).to_dict() == config.to_dict()


def saved_config_from(path):
    return read_config(path, written_by_fit=True)


def test_a_run_folder_with_a_flat_config_resumes_and_exports(disc_dataset, disc_run, tmp_path):
    from cp2image_tf.serving.export import export, load_run
    from cp2image_tf.training.train import fit

    run = tmp_path / "run"
    shutil.copytree(disc_run, run)
    # The disc run's settings in the flat form today's main writes.
    flat = json.loads(FLAT["exemplar"].read_text())
    now = saved_config(run)
    flat.update(steps=now.steps, batch_size=now.batch_size, validate_every=now.validate_every,
                checkpoint_every=now.checkpoint_every, val_cells=now.val_cells,
                grid_cells=now.grid_cells, measurer_steps=now.measurer_steps)
    (run / "config.json").write_text(json.dumps(flat, indent=1))
    now.measurer.steps = now.measurer_steps  # the flat file names the measurer's steps
    assert saved_config(run) == now
    summary = export(run, tmp_path / "models")
    assert Path(summary["path"]).is_dir() and "edit" in summary["signatures"]
    decoder, _, config, _ = load_run(run)
    assert config == now and decoder.get_layer("exemplars").filled.numpy() == 1.0
    more = fit(disc_dataset, run, config_from_dict({**config.to_dict(), "steps": now.steps + 2}),
               progress=False)
    assert more["start_step"] == now.steps and more["steps"] == now.steps + 2
    # fit wrote the config again, sectioned.
    assert "exemplar" in json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("key,value", [("pixel_pool", 1), ("measurer_jitter", 0),
                                       ("pixel_noise", False)])
def test_removed_experiments_load_when_off_and_are_refused_when_on(key, value):
    flat = json.loads(FLAT["exemplar"].read_text())
    assert config_from_dict({**flat, key: value}, "config.json") is not None
    on = {"pixel_pool": 4, "measurer_jitter": 2, "pixel_noise": True}[key]
    with pytest.raises(UserInputError, match=f"config.json: {key} .*no longer"):
        config_from_dict({**flat, key: on}, "config.json")
    with pytest.raises(UserInputError, match="pixel_weight 5.0: .*no longer"):
        config_from_dict({**flat, "pixel_weight": 5.0}, "config.json")


@pytest.mark.parametrize("content,kind", [("[1, 2]", "a list"), ('"steps"', "a string"),
                                          ("null", "null"), ("3", "a number")])
def test_a_config_file_that_is_not_an_object_is_one_clear_error(tmp_path, content, kind):
    from cli.main import main as cli

    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=f"config.json: holds {kind}; a config file holds "
                                             "one JSON object"):
        read_config(path)
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "data"), str(tmp_path / "run"),
                                      "--config", str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "holds " + kind in result.output and not (tmp_path / "run").exists()


BAD_SETTINGS = [
    ({"exemplar": {"bank": -5}}, "exemplar.bank -5: must be at least 1"),
    ({"exemplar": {"bank": 0}}, "exemplar.bank 0: must be at least 1"),
    ({"exemplars": -5}, "exemplar.bank -5: must be at least 1"),
    ({"measurer": {"share": 1.5}}, "measurer.share 1.5: must be at least 0 and below 1"),
    ({"measurer_share": 1.0}, "measurer.share 1.0: must be at least 0 and below 1"),
    ({"measurer": {"share": -0.1}}, "measurer.share -0.1: must be at least 0"),
    ({"exemplar": {"top_k": 100000}}, "exemplar.top_k 100000: larger than the bank"),
    ({"exemplar_top_k": 0}, "exemplar.top_k 0: must be at least 1"),
    ({"exemplar": {"identity_share": 1.0}}, "exemplar.identity_share 1.0: must be at least 0 "
                                            "and below 1"),
    ({"exemplar": {"decoder_lr": 0}}, "exemplar.decoder_lr 0: must be positive"),
    ({"exemplar": {"anchor_weight": -1}}, "exemplar.anchor_weight -1: must be at least 0"),
    ({"exemplar": {"adversarial_ramp": [0.5, 0.2]}}, r"exemplar.adversarial_ramp \[0.5, 0.2\]"),
    ({"measurer": {"steps": 0}}, "measurer.steps 0: must be at least 1"),
    ({"judge": {"rounds": -1}}, "judge.rounds -1: must be at least 0"),
    ({"judge": {"lr": 0.0}}, "judge.lr 0.0: must be positive"),
    ({"model": "film", "film": {"pixel_weight": -1}}, "film.pixel_weight -1: must be at least 0"),
    ({"model": "published", "published": {"decoder_beta1": 1.0}},
     "published.decoder_beta1 1.0: must be at least 0 and below 1"),
    ({"steps": 0}, "--steps 0: must be at least 1"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"time_limit": "0s"}, "--time-limit 0.0: must be positive"),
    ({"exemplar": {"bank": "many"}}, '"exemplar.bank" is "many"; it must be a whole number'),
    ({"exemplar": 3}, '"exemplar" is 3; it must be an object'),
    ({"exemplar": {"banks": 3}}, 'unknown setting.s. banks in "exemplar"'),
    ({"exemplarz": 3}, "unknown setting exemplarz"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS,
                         ids=[json.dumps(s) for s, _ in BAD_SETTINGS])
def test_an_out_of_range_setting_is_named(tmp_path, settings, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(UserInputError, match=message):
        read_config(path)


def test_out_of_range_settings_stop_fit_before_anything_is_written(tmp_path):
    from cli.main import main as cli

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"exemplars": -5}))
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "data"), str(tmp_path / "run"),
                                      "--config", str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "exemplar.bank -5" in result.output and not (tmp_path / "run").exists()


def test_the_settings_of_an_unused_section_are_not_checked():
    # A film run ignores the exemplar section (its defaults, or a flat film config's keys).
    assert config_from_dict({"model": "film", "exemplar": {"bank": 0}}).model == "film"


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def run_with_read_only(folders, commands, tmp_path):
    """Run the CLI `commands` with `folders` unwritable: by their mode for a normal user; for
    root, whom modes do not stop, as read-only bind mounts in a private mount namespace
    (unshare), gone with the command. [(exit code, stderr)] per command."""
    import os
    import subprocess
    import sys

    cli = [sys.executable, "-c", "from cli.main import main; main()"]
    root = Path(__file__).resolve().parent.parent
    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(0o555)
        try:
            done = [subprocess.run(cli + list(map(str, args)), cwd=root, capture_output=True,
                                   text=True) for args in commands]
        finally:
            for folder in folders:
                folder.chmod(0o755)
        return [(d.returncode, d.stderr) for d in done]
    script = "".join(f'mount --bind "{f}" "{f}" && mount -o remount,bind,ro "{f}" "{f}" || exit 97\n'
                     for f in folders)
    for i, args in enumerate(commands):
        quoted = " ".join(f"'{a}'" for a in cli[1:] + list(map(str, args)))
        script += f'"{cli[0]}" {quoted} 2>"{tmp_path}/err{i}"; echo $? >"{tmp_path}/rc{i}"\n'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"could not mount read-only: {done.stderr}"
    return [(int((tmp_path / f"rc{i}").read_text()), (tmp_path / f"err{i}").read_text())
            for i in range(len(commands))]


def test_fit_into_a_folder_it_cannot_write_is_one_line_and_writes_nothing(disc_dataset, disc_run,
                                                                          tmp_path):
    run, parent = tmp_path / "run", tmp_path / "read_only"
    shutil.copytree(disc_run, run)
    parent.mkdir()
    before = files_of(run)
    steps = str(saved_config(run).steps + 2)
    results = run_with_read_only(
        [parent, run / "checkpoints"],
        [["fit", disc_dataset, parent / "new_run", "--steps", "2", "--quiet"],
         ["fit", disc_dataset, run, "--steps", steps, "--quiet"]], tmp_path)
    for (code, stderr), folder in zip(results, [parent, run / "checkpoints"]):
        errors = [line for line in stderr.splitlines() if line.startswith("Error")]
        assert code != 0 and "Traceback" not in stderr, stderr
        assert len(errors) == 1 and f"cannot write in {folder}" in errors[0], stderr
        assert "writable" in errors[0]
    assert list(parent.iterdir()) == []
    assert files_of(run) == before  # the resume rewrote neither config.json nor history.csv


def test_fit_under_a_file_is_one_line(disc_dataset, tmp_path):
    from cli.main import main as cli

    (tmp_path / "a_file").write_text("not a folder\n")
    result = CliRunner().invoke(cli, ["fit", str(disc_dataset), str(tmp_path / "a_file" / "run"),
                                      "--steps", "2", "--quiet"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert f"{tmp_path / 'a_file'} is a file" in result.output
