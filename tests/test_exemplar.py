"""The exemplar model: the nearest training cell, edited; its bank filled from training cells,
saved with the weights and served."""
import numpy as np
import pytest

from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.exemplar.bank import bank_layer, bank_size
from cp2image_tf.training.exemplar.networks import build_exemplar_networks
from cp2image_tf.training.train import fit


def _filled(size=40, channels=2, bank=6, n_features=5, seed=0):
    decoder, editor = build_exemplar_networks(n_features, size, channels, width=4, embed=16,
                                              bank=bank, top_k=2)
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(bank, n_features)).astype("float32")
    crops = rng.uniform(0.05, 0.95, size=(bank, size, size, channels)).astype("float32")
    bank_layer(decoder).fill(feats, crops)
    return decoder, editor, feats, crops


@pytest.mark.parametrize("size", [32, 40, 49, 68])
def test_draws_any_crop_from_32_px_and_starts_as_the_nearest_cell(size):
    decoder, _, feats, crops = _filled(size)
    # Asked for a profile near bank cell 3, a new model draws cell 3 (its head starts at zero).
    asked = feats[[3, 1]] + 0.01
    images = decoder(asked, training=False).numpy()
    assert images.shape == (2, size, size, 2)
    np.testing.assert_allclose(images, crops[[3, 1]].astype(np.float16).astype(np.float32),
                               atol=2e-3)
    # Extreme profiles stay inside (0, 1): a sigmoid head, nothing clipped afterwards.
    extreme = decoder(np.full((1, 5), 1e3, "float32"), training=False).numpy()
    assert extreme.min() > 0.0 and extreme.max() < 1.0
    with pytest.raises(ValueError, match="at least 32"):
        build_exemplar_networks(5, 28, 2)


def test_training_never_picks_the_cell_itself():
    decoder, _, feats, crops = _filled(bank=6)
    for _ in range(5):
        _, exemplar_features, _ = bank_layer(decoder)(feats, training=True)
        exemplar_features = np.asarray(exemplar_features)
        # Each cell's exemplar is another bank cell, one of its top_k (2) nearest.
        distances = ((feats[:, None] - feats[None]) ** 2).sum(-1)
        np.fill_diagonal(distances, np.inf)
        nearest2 = np.argsort(distances, 1)[:, :2]
        chosen = [int(np.argmin(((feats - e) ** 2).sum(-1))) for e in exemplar_features]
        assert all(c != i and c in nearest2[i] for i, c in enumerate(chosen)), chosen


def test_every_block_is_conditioned_and_the_bank_fits_its_budget():
    decoder, _ = build_exemplar_networks(5, 40, 3, width=4, embed=16, bank=10)
    films = [layer.name for layer in decoder.layers if layer.__class__.__name__ == "FiLM"]
    assert len(films) == 7
    assert bank_size(2048, 68, 3) == 2048 and bank_size(2048, 68, 3, training_cells=500) == 500
    # 128 x 128 x 5 float16 crops: 819 at 128 MiB.
    assert bank_size(2048, 128, 5) == 128 * 2**20 // (128 * 128 * 5 * 2)


@pytest.fixture(scope="module")
def disc_run_exemplar(disc_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("exemplar") / "run"
    summary = fit(disc_dataset, run, FitConfig(model="exemplar", steps=4, batch_size=8,
                                               val_cells=16, grid_cells=0, measurer={"steps": 2}),
                  progress=False)
    return run, summary


def test_fit_fills_the_bank_from_training_cells_and_export_serves_it(disc_run_exemplar,
                                                                    disc_dataset, tmp_path):
    import tensorflow as tf

    from cp2image_tf.serving.export import export, load_run
    from tfrecords_tools.manifest import load_manifest
    from tfrecords_tools.reader import make_dataset

    run, summary = disc_run_exemplar
    manifest = load_manifest(disc_dataset)
    assert summary["exemplars"] == manifest["counts"]["splits"]["train"]
    decoder, _, config, _ = load_run(run, "latest")
    assert config.model == "exemplar"
    bank = bank_layer(decoder)
    # The bank holds exactly the training split's cells, restored from the checkpoint.
    train = np.concatenate([f.numpy() for f, _ in make_dataset(disc_dataset, "train", 64,
                                                              repeat=False, shuffle=False)])
    stored = np.asarray(bank.bank_features())
    key = lambda rows: sorted(map(tuple, np.round(np.clip(rows, -5, 5), 4)))
    assert key(stored) == key(train)
    served = tf.saved_model.load(export(run, tmp_path / "models", checkpoint="latest")["path"])
    stats = manifest["features"]["stats"]
    raw = np.asarray([stats["median"]], np.float32)
    images = served.signatures["serving_default"](features=tf.constant(raw))["images"].numpy()
    z = (raw - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    np.testing.assert_allclose(images, decoder(z, training=False).numpy(), atol=1e-5)


def test_a_pinned_exemplar_edits_one_cell_and_the_served_model_has_it(disc_run_exemplar, tmp_path):
    run = disc_run_exemplar[0]
    import tensorflow as tf

    from cp2image_tf.serving.export import export
    from cp2image_tf.serving.local import load_model
    from cp2image_tf.training.exemplar.networks import pinned_decoder
    from cp2image_tf.serving.export import load_run

    decoder, manifest, _, _ = load_run(run, "latest")
    bank = bank_layer(decoder)
    feats, crops = np.asarray(bank.bank_features()), np.asarray(bank.crops, np.float32)
    pinned = pinned_decoder(decoder)
    # Asked for cell 0's own profile, pinned to cell 0: the decoder's own drawing of it.
    same = pinned([feats[:1], feats[:1]], training=False).numpy()
    np.testing.assert_allclose(same, decoder(feats[:1], training=False).numpy(), atol=1e-5)
    # Asked for another cell's profile but pinned to cell 0: an edit of cell 0, not cell j.
    far = int(np.argmax(((feats - feats[0]) ** 2).sum(1)))
    edited = pinned([feats[[far]], feats[:1]], training=False).numpy()
    looked_up = decoder(feats[[far]], training=False).numpy()
    assert np.abs(edited - crops[:1]).mean() < np.abs(edited - looked_up).mean()
    # The served model carries the same signature, in raw CellProfiler units.
    served = load_model(export(run, tmp_path / "models", checkpoint="latest")["path"])
    assert served.can_pin
    stats = manifest["features"]["stats"]
    raw = feats * np.asarray(stats["std"], np.float32) + np.asarray(stats["mean"], np.float32)
    np.testing.assert_allclose(served.edits(raw[[far]], raw[0]), edited, atol=1e-4)
    local = load_model(run, "latest")
    np.testing.assert_allclose(local.edits(raw[[far]], raw[0]), edited, atol=1e-4)


def test_training_excludes_the_cell_itself_at_600_features():
    """The expanded distance of a 600-feature cell to itself is float32 rounding, not zero."""
    from cp2image_tf.training.exemplar.bank import ExemplarBank

    rng = np.random.default_rng(3)
    feats = np.clip(rng.normal(scale=2.0, size=(64, 600)), -5, 5).astype("float32")
    bank = ExemplarBank(64, 600, 32, 1, top_k=1)
    bank.build((None, 600))
    bank.fill(feats, np.zeros((64, 32, 32, 1), "float32"))
    _, chosen, _ = bank(feats, training=True)
    same = np.all(np.asarray(chosen) == feats, axis=1)
    assert not same.any(), f"{same.sum()} of 64 cells picked themselves"
    # In inference, the nearest cell by brute force: itself for a bank cell, and for a
    # profile off the bank the cell at the least Euclidean distance.
    _, found, _ = bank(feats, training=False)
    np.testing.assert_array_equal(np.asarray(found), feats)
    asked = rng.normal(size=(16, 600)).astype("float32")
    _, found, _ = bank(asked, training=False)
    brute = ((asked[:, None].astype(np.float64) - feats[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(np.asarray(found), feats[brute])


def test_identity_share_edits_the_cell_itself_and_is_no_fake(disc_dataset):
    """The first identity_share of a batch get the cell itself as exemplar: their loss is the
    mean |logit correction|, and the critic counts only the other rows as fakes."""
    import keras
    import tensorflow as tf

    from cp2image_tf.training.trainer import make_trainer
    from tfrecords_tools.manifest import load_manifest
    from tfrecords_tools.reader import make_dataset

    manifest = load_manifest(disc_dataset)
    config = FitConfig(model="exemplar", steps=10, batch_size=8,
                       exemplar={"identity_share": 0.5, "identity_weight": 3.0,
                                 "anchor_weight": 0.0})
    trainer = make_trainer(manifest, config, tf.distribute.get_strategy())
    features, crops = next(iter(make_dataset(disc_dataset, "train", 8, shuffle=False,
                                             repeat=False, manifest=manifest)))
    bank = bank_layer(trainer.decoder)
    bank.fill(np.resize(features.numpy(), (bank.size, features.shape[1])),
              np.resize(crops.numpy(), (bank.size, *crops.shape[1:])),
              names=manifest["features"]["names"])
    # The identity rows' edit starts from the crop itself: a correction of +1 logit draws
    # f + (1 - f) sigmoid(logit((crop - f) / (1 - f)) + 1), f the crop's floor.
    delta_bias = trainer.decoder.get_layer("delta").bias
    delta_bias.assign(np.ones(2, "float32"))
    edited, _ = trainer.editor([features, crops, tf.clip_by_value(features, -5.0, 5.0)],
                               training=False)
    floor = crops.numpy().min(axis=(1, 2), keepdims=True)
    c = np.clip((crops.numpy() - floor) / (1 - floor), 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(edited.numpy(), floor + (1 - floor) / (1 + (1 - c) / c / np.e),
                               atol=1e-5)

    # A critic whose logit is the sum over channels of the mean pixel; a correction of +20
    # logits draws every generated pixel at 1, so each fake's logit is 2.
    image = keras.Input(crops.shape[1:])
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    logit = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(pooled)
    trainer.critic = keras.Model([image, keras.Input((features.shape[1],))], [logit, pooled])
    delta_bias.assign(np.full(2, 20.0, "float32"))
    losses, _, _ = trainer.losses_and_gradients(features, crops)
    # The 4 identity rows: mean |delta| = 20 each, over the global batch of 8.
    np.testing.assert_allclose(float(losses["identity"]), 4 * 20 / 8, rtol=1e-5)
    real = crops.numpy().mean((1, 2)).sum(-1)
    # Only the 4 other rows are fakes: hinge 1 + 2 each; the generator's loss -2 each.
    np.testing.assert_allclose(float(losses["critic"]),
                               (np.maximum(1 - real, 0).sum() + 4 * 3.0) / 8, rtol=1e-4)
    np.testing.assert_allclose(float(losses["adversarial"]), -4 * 2.0 / 8, rtol=1e-4)


def test_consistency_trusts_each_feature_as_far_as_the_measurer_reads_it(disc_run_exemplar):
    """The trainer's per-feature weights are the measurer's validation r^2 (0 where r <= 0 or
    undefined), scaled to a mean of 1, and are in the checkpoint."""
    import json

    import tensorflow as tf

    run = disc_run_exemplar[0]
    r = np.array([np.nan if v is None else v
                  for v in json.loads((run / "measurer.json").read_text())["r"]])
    assert len(r) and np.isfinite(r).any()
    squared = np.clip(np.nan_to_num(r), 0.0, 1.0) ** 2
    stored = tf.train.load_variable(str(tf.train.latest_checkpoint(str(run / "checkpoints"))),
                                    "reliability/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_allclose(stored, squared / squared.mean(), rtol=1e-5)


def test_reliability_weights_by_r_squared():
    import tensorflow as tf

    from cp2image_tf.training.shared.critic_trainer import CriticTrainer

    class Stub:
        n_features = 4
        settings = FitConfig(model="exemplar").section
        reliability = tf.Variable(tf.ones([4]))

    stub = Stub()
    CriticTrainer.set_reliability(stub, [0.5, np.nan, -0.2, 1.0])
    # r^2 = 0.25, 0, 0, 1; mean 0.3125.
    np.testing.assert_allclose(stub.reliability.numpy(), [0.8, 0.0, 0.0, 3.2], rtol=1e-6)
    # measurer_report's list, where an undefined r is None.
    CriticTrainer.set_reliability(stub, [0.5, None, -0.2, 1.0])
    np.testing.assert_allclose(stub.reliability.numpy(), [0.8, 0.0, 0.0, 3.2], rtol=1e-6)
    stub.settings = FitConfig(model="film").section
    CriticTrainer.set_reliability(stub, [0.5, np.nan, -0.2, 1.0])
    np.testing.assert_allclose(stub.reliability.numpy(), np.ones(4))


def test_the_bank_offers_its_cells_turned_and_mirrored_with_their_profiles():
    """A profile whose texture runs another way than a bank cell's finds that cell turned or
    mirrored to match, with the profile the view has."""
    from cp2image_tf.training.exemplar.bank import ExemplarBank
    from cp2image_tf.training.shared.symmetry import view_maps, view_order

    names = (["Cells_AreaShape_Area", "Nuclei_AreaShape_Orientation"]
             + [f"Cells_Texture_Contrast_DNA_3_0{d}_256" for d in range(4)]
             + [f"Nuclei_Texture_Correlation_Actin_3_0{d}_256" for d in range(4)])
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, len(names))).astype("float32")
    crops = rng.uniform(size=(12, 32, 32, 2)).astype("float32")
    bank = ExemplarBank(12, len(names), 32, 2, top_k=1, views=4)
    bank.build((None, len(names)))
    bank.fill(feats, crops, names=names)
    sources, weights = view_maps(names)
    sources, mask = sources[:4], weights[:4].prod(0)
    # Orientation is left out (a quarter turn or a mirror changes it); the rest counts.
    assert mask.tolist() == [1, 0] + [1] * 8
    stored = crops.astype(np.float16).astype(np.float32)
    for cell, view in [(5, 1), (2, 2), (7, 3), (9, 0)]:
        asked = feats[cell][sources[view]][None]
        crop, profile, _ = bank(asked, training=False)
        k, mirror = view_order()[view]
        expected = np.rot90(stored[cell], k, axes=(0, 1))
        expected = expected[:, ::-1] if mirror else expected
        np.testing.assert_array_equal(np.asarray(crop)[0], expected)
        np.testing.assert_allclose(np.asarray(profile)[0], feats[cell][sources[view]])
    # Any profile: the view of a cell at the least distance over the features every view has.
    asked = rng.normal(size=(20, len(names))).astype("float32")
    distance = np.stack([(((asked[:, None] - feats[:, s][None]) ** 2) * mask).sum(-1)
                         for s in sources], 1).reshape(20, -1)
    best = distance.argmin(1)
    _, profile, _ = bank(asked, training=False)
    np.testing.assert_allclose(np.asarray(profile),
                               np.stack([feats[b % 12][sources[b // 12]] for b in best]),
                               rtol=1e-6)
    # Training never picks the cell itself, in any view.
    _, picked, _ = bank(feats, training=True)
    for i, p in enumerate(np.asarray(picked)):
        assert not any(np.allclose(p, feats[i][s]) for s in sources), i
    # A shape weight counts the shape features (the area, not the orientation) that many
    # times: other cells are nearest, the same ones served and in training's distance.
    bank.fill(feats, crops, names=names, shape_weight=5.0)
    weighted = mask * np.array([5.0, 1] + [1] * 8)
    distance = np.stack([(((asked[:, None] - feats[:, s][None]) ** 2) * weighted).sum(-1)
                         for s in sources], 1).reshape(20, -1)
    assert (distance.argmin(1) != best).sum() >= 3
    best = distance.argmin(1)
    nearest = np.stack([feats[b % 12][sources[b // 12]] for b in best])
    _, profile, _ = bank(asked, training=False)
    np.testing.assert_allclose(np.asarray(profile), nearest, rtol=1e-6)
    # Training picks among the top_k (1) nearest by the same distance.
    _, picked, _ = bank(asked, training=True)
    np.testing.assert_allclose(np.asarray(picked), nearest, rtol=1e-6)
    with pytest.raises(ValueError, match="views"):
        ExemplarBank(12, len(names), 32, 2).fill(feats, crops, names=names, shape_weight=5.0)
    from tfrecords_tools.errors import UserInputError
    with pytest.raises(UserInputError, match="exemplar.shape_weight 5.0 with exemplar.views "
                       "false: .* set exemplar.shape_weight to 1"):
        FitConfig(exemplar={"views": False, "shape_weight": 5.0}).validate()
    with pytest.raises(UserInputError, match="exemplar.shape_weight 0: must be positive"):
        FitConfig(exemplar={"shape_weight": 0}).validate()
    FitConfig(exemplar={"views": False, "shape_weight": 1.0}).validate()


def test_an_edit_never_goes_below_the_exemplars_background_floor():
    from cp2image_tf.training.exemplar.networks import EditAboveFloor

    rng = np.random.default_rng(1)
    exemplar = rng.uniform(0.02, 0.9, size=(3, 32, 32, 2)).astype("float32")
    exemplar[0, 5, 5, 0] = 0.015  # the floor of cell 0's first channel
    layer = EditAboveFloor()
    # No correction: the exemplar itself.
    np.testing.assert_allclose(layer([exemplar, np.zeros_like(exemplar)]).numpy(), exemplar,
                               atol=2e-3)
    # Any correction, however dark: never below each channel's floor, never above 1.
    pushed = layer([exemplar, np.full_like(exemplar, -50.0)]).numpy()
    floor = exemplar.min(axis=(1, 2), keepdims=True)
    assert (pushed >= floor - 1e-6).all() and pushed[0, ..., 0].min() < 0.016
    assert (layer([exemplar, np.full_like(exemplar, 50.0)]).numpy() <= 1.0).all()


def test_a_run_from_before_the_four_view_bank_is_resumed_and_exported_as_it_was(tmp_path):
    import json

    from pathlib import Path

    from cp2image_tf.training.run_folder import check_run_dir, saved_config as run_config
    from tfrecords_tools.errors import UserInputError

    run = tmp_path / "run"
    run.mkdir()
    # A flat config.json as fit wrote it before the sections, from before the four-view bank.
    flat = Path(__file__).parent / "data" / "config_flat_2026-12-06.json"
    old = {k: v for k, v in json.loads(flat.read_text()).items()
           if k not in ("exemplar_views", "exemplar_shape_weight")}
    (run / "config.json").write_text(json.dumps(old))
    # One message names every setting to give back (a bank of one view weighs no feature).
    with pytest.raises(UserInputError, match='"exemplar": {"views": false, '
                                             '"shape_weight": 1.0}}'):
        check_run_dir(run, {}, FitConfig())
    check_run_dir(run, {}, FitConfig(exemplar={"views": False, "shape_weight": 1.0}))
    # A run of four views from before the shape weight counted every feature once.
    (run / "config.json").write_text(json.dumps({**old, "exemplar_views": True}))
    with pytest.raises(UserInputError, match=r'exemplar.shape_weight=1.0, now 4.0; .*'
                                             r'\{"exemplar": \{"shape_weight": 1.0\}\}'):
        check_run_dir(run, {}, FitConfig())
    assert run_config(run).exemplar.shape_weight == 1.0
    # Export builds the network it was trained with; the other keys as written.
    (run / "config.json").write_text(json.dumps({**old, "exemplar_top_k": 4}))
    config = run_config(run)
    assert config.exemplar.views is False and config.exemplar.top_k == 4
    assert config.exemplar.shape_weight == 1.0
    # The key means nothing to the other models.
    (run / "config.json").write_text(json.dumps({**old, "model": "film"}))
    check_run_dir(run, {}, FitConfig(model="film"))


@pytest.mark.parametrize("views,noise_dim,size,warp", [(True, 0, 36, True), (False, 2, 34, False)])
def test_the_served_graph_folds_the_weights_and_draws_what_the_decoder_draws(views, noise_dim,
                                                                             size, warp):
    """The SavedModel serves the exemplar model through folded.py (batch norm folded into the
    convolutions, FiLM in one product, the lookup prefiltered in a few principal axes and
    measured exactly): the same images as the Keras decoder, for any weights."""
    from cp2image_tf.training.exemplar.folded import CANDIDATES, PROJECTION, make_folded
    from cp2image_tf.training.exemplar.networks import pinned_decoder

    # 36 px: 36 -> 18 -> 9 and back, each upsampled map twice its input (a transposed
    # convolution); 34 px: 17 -> 9, upsampled to 18 and cropped to 17 (the cropped way).
    n_features, cells = 2 * PROJECTION + 72, 160
    names = ([f"Cells_Texture_Contrast_DNA_3_0{d}_256" for d in range(4)]
             + ["Nuclei_AreaShape_Orientation", "Nuclei_AreaShape_Area", "Cells_AreaShape_Area"]
             + [f"Cells_Intensity_Feature{j}_DNA" for j in range(n_features - 7)])
    decoder, _ = build_exemplar_networks(n_features, size, 2, noise_dim=noise_dim, width=4,
                                         embed=16, bank=cells, views=views, warp=warp)
    rng = np.random.default_rng(0)
    for weight in decoder.weights:
        if weight.path.startswith("exemplars"):
            continue
        shape = tuple(weight.shape)
        value = (rng.uniform(0.5, 2.0, shape) if "variance" in weight.path
                 else rng.normal(0.0, 0.3 if "delta" in weight.path or "warp" in weight.path
                                 else 0.05, shape))
        weight.assign(value.astype("float32"))
    # Profiles as CellProfiler's are: hundreds of features, a few dozen independent.
    mixing = rng.normal(size=(24, n_features)) / np.sqrt(24)
    profiles = lambda n: (rng.normal(size=(n, 24)) @ mixing  # noqa: E731
                          + 0.1 * rng.normal(size=(n, n_features))).astype("float32")
    # With views, the lookup weighs the two shape features three times.
    bank_layer(decoder).fill(profiles(cells), rng.uniform(0.05, 0.95, (cells, size, size, 2)),
                             names=names, shape_weight=3.0 if views else 1.0)
    folded = make_folded(decoder)
    assert folded.projection is not None and cells * (4 if views else 1) > CANDIDATES
    z, like = profiles(24), profiles(24)
    z[0] *= 8.0  # beyond the features' clip (5 SD): clipped in the difference to the exemplar
    inputs = [z, np.zeros((24, noise_dim), "float32")] if noise_dim else z
    expected = decoder(inputs, training=False).numpy()
    assert np.abs(expected - bank_layer(decoder)(z)[0].numpy()).mean() > 0.03  # edits, not copies
    np.testing.assert_allclose(folded.draw(z).numpy(), expected, atol=1e-5)
    # One cell (the explore page's request) takes its own branch: FiLM folded into the kernels.
    np.testing.assert_allclose(folded.draw(z[:1]).numpy(), expected[:1], atol=1e-5)
    np.testing.assert_allclose(folded.draw(z[1:2]).numpy(), expected[1:2], atol=1e-5)
    if noise_dim:  # the sampling signature's noise enters the embedding as in the decoder
        noise = rng.normal(size=(24, noise_dim)).astype("float32")
        np.testing.assert_allclose(folded.draw(z, noise=noise).numpy(),
                                   decoder([z, noise], training=False).numpy(), atol=1e-5)
    pinned = pinned_decoder(decoder)
    pinned_inputs = [z, inputs[1], like] if noise_dim else [z, like]
    np.testing.assert_allclose(folded.draw(z, like).numpy(),
                               pinned(pinned_inputs, training=False).numpy(), atol=1e-5)


def test_the_warp_samples_as_the_served_op_and_grows_shrinks_or_stretches_the_cell():
    """WarpCrop (training) samples as tf.raw_ops.ImageProjectiveTransformV3 (serving), gives
    the crop back at zero parameters, and its parameters get gradients (the op's do not)."""
    import tensorflow as tf

    from cp2image_tf.training.exemplar.networks import WARP_LIMIT, WarpCrop, warp_transforms

    size = 33
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    disc = (np.hypot(xx, yy) < 8).astype("float32")
    rng = np.random.default_rng(0)
    crops = np.stack([disc, disc, disc, rng.uniform(size=(size, size)).astype("float32")])
    crops = np.stack([crops, 1.0 - crops], axis=-1)  # [4, size, size, 2]
    grow = np.arctanh(-0.3 / WARP_LIMIT)  # each axis read from 0.7 of its length: x 1/0.7
    params = np.array([[0, 0, 0], [grow, 0, grow], [-grow, 0, 0], [0.7, -1.1, 0.4]], "float32")
    warped = WarpCrop()([crops, params]).numpy()
    served = tf.raw_ops.ImageProjectiveTransformV3(
        images=crops, transforms=warp_transforms(params, size, size), output_shape=[size, size],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST").numpy()
    np.testing.assert_allclose(warped, served, atol=1e-6)
    np.testing.assert_array_equal(warped[0], crops[0])
    area = warped[:, :, :, 0].sum(axis=(1, 2))
    assert area[1] == pytest.approx(disc.sum() / 0.7 ** 2, rel=0.05)  # grown both ways
    assert area[2] == pytest.approx(disc.sum() / 1.3, rel=0.05)  # shrunk along x only
    rows, cols = warped[2, :, :, 0].sum(axis=1).max(), warped[2, :, :, 0].sum(axis=0).max()
    assert rows < 0.85 * cols  # narrower than tall
    variable = tf.Variable(params)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(WarpCrop()([crops, variable]) ** 2)
    gradient = tape.gradient(loss, variable).numpy()
    # (a disc's shear gradient is zero by symmetry, the noise crop's is not)
    assert np.all(np.isfinite(gradient)) and np.abs(gradient[1:, [0, 2]]).min() > 0
    assert np.abs(gradient[3]).min() > 0
