"""The film model: shapes from 32 px, bounded output, the measurer on training cells only,
the published network one option away, --time-limit and its resume."""
import json

import numpy as np
import pandas as pd
import pytest

from cp2image_tf.training.config import FitConfig, parse_duration
from cp2image_tf.training.film.networks import build_film_decoder
from cp2image_tf.training.shared.critic import build_critic
from cp2image_tf.training.shared.measurer import build_measurer
from cp2image_tf.training.networks import build_model_decoder
from cp2image_tf.training.train import fit
from tfrecords_tools.errors import UserInputError


@pytest.mark.parametrize("size", [32, 40, 48, 68, 70])
def test_decoder_draws_any_crop_from_32_px_in_the_unit_range(size):
    decoder = build_film_decoder(11, size, 2, width=8, embed=32)
    rng = np.random.default_rng(0)
    images = decoder(rng.normal(scale=30, size=(3, 11)).astype("float32"), training=False).numpy()
    assert images.shape == (3, size, size, 2)
    # A sigmoid head: strictly inside (0, 1) even for extreme profiles, nothing clipped.
    assert images.min() > 0.0 and images.max() < 1.0
    with pytest.raises(ValueError, match="at least 32"):
        build_film_decoder(11, 28, 2)


def test_every_block_is_conditioned_and_noise_is_an_input():
    decoder = build_film_decoder(5, 40, 3, noise_dim=4, width=8, embed=16)
    films = [layer.name for layer in decoder.layers if layer.__class__.__name__ == "FiLM"]
    assert films == [f"level{lv}_conv{c}_film" for lv in (1, 2, 3) for c in (1, 2)]
    assert [tuple(i.shape) for i in decoder.inputs] == [(None, 5), (None, 4)]


def test_measurer_and_critic_shapes():
    measurer = build_measurer(7, 40, 2, width=8)
    assert measurer(np.zeros((2, 40, 40, 2), "float32")).shape == (2, 7)
    critic = build_critic(7, 40, 2, width=8)
    logit, *activations = critic([np.zeros((2, 40, 40, 2), "float32"), np.zeros((2, 7), "float32")])
    assert logit.shape == (2, 1) and [a.shape[1] for a in activations] == [20, 10, 5]


def test_model_option_builds_the_published_network():
    manifest = {"features": {"count": 9}, "crop": {"height": 68, "channels": 3},
                "counts": {"splits": {"train": 50}}}
    published = build_model_decoder(manifest, FitConfig(model="published"))
    names = [layer.name for layer in published.layers]
    assert [n for n in names if n.endswith("_conv")] == [
        "block1_conv", "block2_conv", "block3_conv", "block4_conv", "reconstructor_conv"]
    assert published.get_layer("block1_conv").kernel.shape == (5, 5, 9, 32)
    film = build_model_decoder(manifest, FitConfig(model="film"))
    assert "level1_conv1_film" in [l.name for l in film.layers]
    # The default is the exemplar model: a bank of (here all 50) training cells and an editor.
    default = build_model_decoder(manifest, FitConfig())
    assert FitConfig().model == "exemplar" and default.get_layer("exemplars").size == 50
    # Each model brings its own defaults; given values win.
    assert (FitConfig(model="published").batch_size, FitConfig().batch_size) == (104, 32)
    assert FitConfig(model="published", published={"decoder_lr": 0.5}).published.decoder_lr == 0.5
    with pytest.raises(UserInputError, match="--model"):
        FitConfig(model="gan").validate()
    with pytest.raises(UserInputError, match="measurer.patience -1: must be at least 0"):
        FitConfig(measurer={"patience": -1}).validate()


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "30m", "1.5h", None)] == [90, 90, 1800, 5400, None]
    with pytest.raises(UserInputError, match="--time-limit thirty"):
        parse_duration("thirty")


def test_measurer_learns_from_training_cells_only(disc_dataset, tmp_path, monkeypatch):
    import tfrecords_tools.reader as reader

    made = []
    original = reader.make_dataset

    def spy(data_dir, split="train", *args, **kwargs):
        made.append((split, kwargs.get("repeat")))
        return original(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(reader, "make_dataset", spy)
    summary = fit(disc_dataset, tmp_path / "run", FitConfig(steps=2, measurer={"steps": 30}, batch_size=8,
                                                            val_cells=64, grid_cells=0),
                  progress=False)
    # Every dataset that is trained on (repeated) is the training split; val only validates.
    assert {split for split, repeat in made if repeat} == {"train"}
    assert ("val", False) in made
    report = json.loads((tmp_path / "run" / "measurer.json").read_text())
    assert report["steps"] == 30 and report["split"] == "val" and report == summary["measurer"]
    # The discs' two features (area, mean DNA) are what it reads.
    assert set(report["modules"]) == {"AreaShape", "Intensity"}
    assert report["median_r"] > 0.5, report


def test_measurer_keeps_its_best_check_and_stops_when_it_no_longer_improves(disc_dataset, tmp_path,
                                                                            monkeypatch):
    import cp2image_tf.training.shared.measurer as measurer_module

    scores = iter([0.1, 0.3, 0.2, 0.25, 0.3])   # checks at steps 3, 6, 9, 12, 15
    seen = []

    def scripted(measurer, crops, features, names):
        seen.append(measurer.get_weights())
        fraction = next(scores, 0.0)
        return {"fraction_r_0.7": fraction, "median_r": 0.5, "modules": {},
                "r": [0.5] * len(names), "cells": len(crops)}

    monkeypatch.setattr(measurer_module, "measurer_report", scripted)
    run = tmp_path / "run"
    config = FitConfig(steps=1, measurer={"steps": 100, "check_every": 3, "patience": 3},
                       batch_size=8, val_cells=16, grid_cells=0)
    summary = fit(disc_dataset, run, config, progress=False)
    report = json.loads((run / "measurer.json").read_text())
    # Three checks without a better one after step 6 (a tie is not better): stopped at 15.
    assert report["steps"] == 15 and report["kept_step"] == 6
    assert [c["step"] for c in report["checks"]] == [3, 6, 9, 12, 15]
    # The measurer it ends with (the last report's) is the one of step 6, not of step 15.
    for kept, final, last in zip(seen[1], seen[-1], seen[4]):
        np.testing.assert_array_equal(final, kept)
    assert any(not np.array_equal(a, b) for a, b in zip(seen[-1], seen[4]))
    assert summary["measurer"]["kept_step"] == 6
    # Resumed, phase 1 is over: the measurer does not train again. Its r on real crops is read
    # once more (for the judge rounds' reliability), from the measurer as it was kept.
    again = fit(disc_dataset, run, FitConfig(**{**config.__dict__, "steps": 2}), progress=False)
    assert "measurer" not in again and len(seen) == 7
    for kept, resumed in zip(seen[5], seen[6]):
        np.testing.assert_array_equal(resumed, kept)


def test_time_limit_stops_cleanly_and_resume_continues_the_budget(disc_dataset, tmp_path):
    run = tmp_path / "run"
    config = dict(batch_size=8, log_every=1, validate_every=1000, checkpoint_every=1000,
                  val_cells=32, grid_cells=0, steps=100000, judge={"rounds": 0})
    first = fit(disc_dataset, run, FitConfig(time_limit=20, **config), progress=False)
    assert first["stopped_by"] == "time limit" and 0 < first["steps"] < 100000
    assert 20 <= first["seconds"] < 60 and first["images_per_s"] > 0
    # The schedule's length was planned from the first steps' speed and kept in the checkpoint.
    assert 0 < first["total_steps"] < 100000
    history = pd.read_csv(run / "history.csv")
    assert history["step"].max() == first["steps"] and history["val_mse"].notna().iloc[-1]
    assert (run / "checkpoints" / f"ckpt-{first['steps']}.index").is_file()
    # The same budget again: nothing left, no step taken.
    again = fit(disc_dataset, run, FitConfig(time_limit=20, **config), progress=False)
    assert again["steps"] == first["steps"]
    # A larger budget continues from the checkpoint with the planned schedule.
    limit = first["seconds"] + 15
    more = fit(disc_dataset, run, FitConfig(time_limit=limit, **config), progress=False)
    assert more["start_step"] == first["steps"] < more["steps"]
    assert more["seconds"] >= limit and more["total_steps"] == first["total_steps"]
    from cp2image_tf.training.trainer import make_trainer
    import tensorflow as tf
    from tfrecords_tools.manifest import load_manifest

    trainer = make_trainer(load_manifest(disc_dataset), FitConfig(**config),
                           tf.distribute.get_strategy())
    trainer.checkpoint.restore(tf.train.latest_checkpoint(str(run / "checkpoints")))
    assert int(trainer.total_steps.numpy()) == first["total_steps"]


def test_film_learns_discs(disc_dataset, tmp_path):
    run = tmp_path / "run"
    summary = fit(disc_dataset, run, FitConfig(model="film", steps=120, batch_size=16, log_every=10,
                                               validate_every=60, checkpoint_every=60,
                                               val_cells=64, grid_cells=4), progress=False)
    # Well below the mean training image: the decoder draws each cell's own disc.
    assert summary["val_mse"] < 0.5 * summary["baseline_mse"], summary
    history = pd.read_csv(run / "history.csv")
    assert {"pixel", "consistency", "adversarial", "critic", "w_consistency"} <= set(history.columns)
    # Every loss is in use within the run: the ramps are fractions of --steps.
    last = history.dropna(subset=["w_adversarial"]).iloc[-1]
    assert last["w_consistency"] == FitConfig(model="film").film.consistency_weight
    assert last["w_adversarial"] == FitConfig(model="film").film.adversarial_weight
    assert json.loads((run / "config.json").read_text())["model"] == "film"
    # best/ follows the latest validation, not the lowest pixel MSE.
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 120


@pytest.mark.parametrize("model", ["exemplar", "film", "published"])
def test_both_models_export_and_serve(disc_dataset, tmp_path, model):
    import tensorflow as tf

    from cp2image_tf.serving.export import export, load_run

    run = tmp_path / "run"
    fit(disc_dataset, run, FitConfig(model=model, steps=2, batch_size=8, val_cells=16,
                                     grid_cells=0, measurer={"steps": 2}), progress=False)
    summary = export(run, tmp_path / "models", checkpoint="latest")
    decoder, manifest, config, _ = load_run(run, "latest")
    assert config.model == model
    served = tf.saved_model.load(summary["path"]).signatures["serving_default"]
    stats = manifest["features"]["stats"]
    raw = np.asarray([stats["median"], stats["mean"]], np.float32)
    images = served(features=tf.constant(raw))["images"].numpy()
    assert images.shape == (2, 48, 48, 2) and 0.0 <= images.min() and images.max() <= 1.0
    # The served graph is the run's decoder on the normalised features.
    z = (raw - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    expected = np.clip(decoder(z, training=False).numpy(), 0, 1)
    np.testing.assert_allclose(images, expected, atol=1e-5)
