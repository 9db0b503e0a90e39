"""fit: train the conditional decoder with pixel + adversarially learned perceptual loss.

A custom training step run by `strategy.run` inside a tf.function (Keras 3's
Model.fit does not run under MultiWorkerMirroredStrategy), the same code on one
device, several local devices or several machines. Both networks update from
the same forward pass every step, as published: the decoder from the pixel loss
plus the scheduled feature losses, the discriminator from its cross-entropy on
an independent real batch vs the generated cells.

Run folder:
    config.json        the FitConfig in force
    manifest.json      the dataset's manifest (features, normalisation, channels)
    checkpoints/       the latest checkpoints (tf.train.CheckpointManager)
    best/              the checkpoint with the lowest validation pixel MSE, best.json
    history.csv        losses, schedule weights, images/s, validation metrics
    logs/              TensorBoard
    samples/           real vs generated validation cells, step_<N>.png and latest.png
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cp2image_tf.training.config import FitConfig
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest

N_FEATURE_LAYERS = 4
MODEL_KEYS = ("filters", "noise_dim")


def data_signature(manifest: dict) -> dict:
    """What a trained model is tied to: feature names in order, channels, crop shape."""
    crop = manifest["crop"]
    return {"features": manifest["features"]["names"], "channels": manifest["channels"],
            "crop": [crop["height"], crop["width"], crop["channels"]]}


def check_run_dir(run_dir: Path, manifest: dict, config: FitConfig) -> None:
    """An existing run must have been trained on data of the same shape and the same model."""
    saved = run_dir / "manifest.json"
    if saved.is_file():
        old = data_signature(json.loads(saved.read_text()))
        new = data_signature(manifest)
        for key in ("features", "channels", "crop"):
            if old[key] != new[key]:
                what = {"features": f"{len(old['features'])} features vs {len(new['features'])}"
                        if len(old["features"]) != len(new["features"]) else "other feature names",
                        "channels": f"channels {old['channels']} vs {new['channels']}",
                        "crop": f"crop {old['crop']} vs {new['crop']}"}[key]
                raise UserInputError(
                    f"{run_dir}: its checkpoints were trained on other data ({what}). "
                    "Use a new RUN_DIR for this dataset.")
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        old = json.loads(saved_config.read_text())
        for key in MODEL_KEYS:
            if key in old and old[key] != getattr(config, key):
                raise UserInputError(
                    f"{run_dir}: was trained with {key}={old[key]}, now {getattr(config, key)}; "
                    "the checkpoint cannot be resumed with another model. Use a new RUN_DIR.")


class Trainer:
    """The two networks, their optimisers, the step counter and the distributed step."""

    def __init__(self, manifest: dict, config: FitConfig, strategy):
        import keras
        import tensorflow as tf

        from cp2image_tf.training.model import (build_decoder, build_discriminator, conv_kernels,
                                       training_decoder)

        self.manifest, self.config, self.strategy = manifest, config, strategy
        crop = manifest["crop"]
        self.crop_shape = (crop["height"], crop["width"], crop["channels"])
        self.image_size = int(np.prod(self.crop_shape))
        self.n_features = manifest["features"]["count"]
        self.global_batch = config.batch_size
        if config.batch_size % strategy.num_replicas_in_sync:
            raise UserInputError(f"--batch-size {config.batch_size}: must divide evenly over "
                                 f"{strategy.num_replicas_in_sync} replicas.")
        with strategy.scope():
            self.decoder = build_decoder(self.n_features, crop["height"], crop["channels"],
                                         noise_dim=config.noise_dim, filters=config.filters)
            self.decoder_raw = training_decoder(self.decoder)
            self.discriminator = build_discriminator(crop["height"], crop["channels"],
                                                     filters=config.filters)
            self.decoder_optimizer = keras.optimizers.Adam(
                config.decoder_lr, beta_1=config.decoder_beta1, beta_2=config.decoder_beta2,
                epsilon=config.decoder_epsilon, name="decoder_adam")
            self.discriminator_optimizer = keras.optimizers.SGD(
                config.discriminator_lr, momentum=config.discriminator_momentum,
                name="discriminator_sgd")
            if config.mixed_precision:
                self.decoder_optimizer = keras.optimizers.LossScaleOptimizer(self.decoder_optimizer)
                self.discriminator_optimizer = keras.optimizers.LossScaleOptimizer(
                    self.discriminator_optimizer)
            self.decoder_optimizer.build(self.decoder.trainable_variables)
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.kernels = conv_kernels(self.decoder) + conv_kernels(self.discriminator)
        self.checkpoint = tf.train.Checkpoint(
            decoder=self.decoder, discriminator=self.discriminator,
            decoder_optimizer=self.decoder_optimizer,
            discriminator_optimizer=self.discriminator_optimizer, step=self.step)
        self._train_step = None
        self._compiled_gradients = None

    def noise_for(self, batch):
        import tensorflow as tf

        return tf.random.normal([batch, self.config.noise_dim])

    def decoder_inputs(self, features):
        import tensorflow as tf

        features = tf.convert_to_tensor(features, tf.float32)
        if not self.config.noise_dim:
            return features
        return [features, self.noise_for(tf.shape(features)[0])]

    def replica_step(self, features, target, real):
        """One step on one replica's share of the global batch; returns the loss terms."""
        losses, decoder_grads, disc_grads = self._gradients(features, target, real)
        self.decoder_optimizer.apply_gradients(zip(decoder_grads, self.decoder.trainable_variables))
        self.discriminator_optimizer.apply_gradients(
            zip(disc_grads, self.discriminator.trainable_variables))
        return losses

    def _gradients(self, features, target, real):
        if self._compiled_gradients is None:
            import tensorflow as tf

            # XLA fuses the forward and backward passes on one device. With several replicas
            # the synchronised batch norm all-reduces, which a nested tf.function cannot do.
            if self.config.jit_compile and self.strategy.num_replicas_in_sync == 1:
                self._compiled_gradients = tf.function(self.losses_and_gradients, jit_compile=True)
            else:
                self._compiled_gradients = self.losses_and_gradients
        return self._compiled_gradients(features, target, real)

    def losses_and_gradients(self, features, target, real):
        """Forward both networks once; loss terms and both networks' gradients."""
        import tensorflow as tf

        from cp2image_tf.training.losses import (discriminator_loss, feature_loss, perceptual_weights,
                                        pixel_loss)

        cfg = self.config
        n = tf.shape(target)[0]
        with tf.GradientTape(persistent=True) as tape:
            generated = tf.cast(self.decoder_raw(self.decoder_inputs(features), training=True),
                                tf.float32)
            # One discriminator pass over [real, generated, target]; its batch norm takes
            # training statistics from the real and generated parts only.
            logit, *activations = self.discriminator(tf.concat([real, generated, target], 0),
                                                     training=True)
            logit = tf.cast(logit, tf.float32)
            pixel = pixel_loss(generated, target, self.global_batch)
            features_terms = [feature_loss(tf.cast(a[n:2 * n], tf.float32),
                                           tf.cast(a[2 * n:], tf.float32),
                                           self.image_size, self.global_batch) for a in activations]
            weights = perceptual_weights(self.step, N_FEATURE_LAYERS, cfg.perceptual_delay,
                                         cfg.perceptual_slope)
            decoder_loss = pixel + tf.add_n([weights[k] * features_terms[k]
                                             for k in range(N_FEATURE_LAYERS)])
            disc_loss = discriminator_loss(logit[:n], logit[n:2 * n], self.global_batch)
            if cfg.mixed_precision:
                scaled_decoder = self.decoder_optimizer.scale_loss(decoder_loss)
                scaled_disc = self.discriminator_optimizer.scale_loss(disc_loss)
            else:
                scaled_decoder, scaled_disc = decoder_loss, disc_loss
        decoder_vars = self.decoder.trainable_variables
        disc_vars = self.discriminator.trainable_variables
        decoder_grads = tape.gradient(scaled_decoder, decoder_vars)
        disc_grads = tape.gradient(scaled_disc, disc_vars)
        del tape
        losses = {"pixel": pixel, "decoder": decoder_loss, "discriminator": disc_loss}
        for k in range(N_FEATURE_LAYERS):
            losses[f"feature{k + 1}"] = features_terms[k]
        return losses, decoder_grads, disc_grads

    def train_step_fn(self):
        """A tf.function: (target iterator, real iterator) -> global loss terms; advances the step."""
        import tensorflow as tf

        if self._train_step is not None:
            return self._train_step
        strategy = self.strategy
        decay = 1.0 - self.config.weight_decay

        @tf.function
        def step(target_iterator, real_iterator):
            features, target = next(target_iterator)
            _, real = next(real_iterator)
            per_replica = strategy.run(self.replica_step, args=(features, target, real))
            losses = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                      for k, v in per_replica.items()}
            # Published weight decay: every kernel shrinks by (1 - 1e-4) after each step,
            # independent of the learning rate; batch-norm parameters are left alone.
            for kernel in self.kernels:
                kernel.assign(kernel * decay)
            self.step.assign_add(1)
            return losses

        self._train_step = step
        return step

    def generate(self, features):
        """Images in [0, 1] from normalised features, inference mode."""
        return self.decoder(self.decoder_inputs(features), training=False)


def load_val_cells(data_dir, manifest, config, limit):
    """The first `limit` validation cells (deterministic order): features, crops, treatments."""
    from tfrecords_tools.reader import make_dataset

    split = "val" if manifest["counts"]["splits"]["val"] else "train"
    ds = make_dataset(data_dir, split, 256, shuffle=False, repeat=False, with_metadata=True,
                      scaling=config.scaling, normalization=config.normalization, manifest=manifest)
    feats, crops, treatments, ids = [], [], [], []
    total = 0
    for f, c, meta in ds:
        feats.append(f.numpy())
        crops.append(c.numpy())
        treatments += [t.decode() for t in meta["treatment"].numpy()]
        ids += [i.decode() for i in meta["cell_id"].numpy()]
        total += len(f)
        if total >= limit:
            break
    return (np.concatenate(feats)[:limit], np.concatenate(crops)[:limit], treatments[:limit],
            ids[:limit], split)


def mean_training_image(data_dir, manifest, config, limit=4096):
    """The mean training crop (the baseline a decoder must beat), over up to `limit` cells."""
    from tfrecords_tools.reader import make_dataset

    ds = make_dataset(data_dir, "train", 256, shuffle=False, repeat=False,
                      scaling=config.scaling, manifest=manifest)
    total, count = None, 0
    for _, crops in ds:
        crops = crops.numpy().astype(np.float64)
        total = crops.sum(0) if total is None else total + crops.sum(0)
        count += len(crops)
        if count >= limit:
            break
    return (total / count).astype(np.float32)


def grid_indices(treatments, n):
    """Up to n validation cells, one per treatment first, in a fixed order."""
    chosen, seen = [], set()
    for i, t in enumerate(treatments):
        if t not in seen and len(chosen) < n:
            chosen.append(i)
            seen.add(t)
    for i in range(len(treatments)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def pixel_metrics(generated, real):
    """Mean pixel MSE and SSIM over the cells (images in [0, 1]), as `evaluate` computes them."""
    from cp2image_tf.metrics import pixel_metrics as per_cell

    values = per_cell(generated, real)
    return float(values["mse"].mean()), float(values["ssim"].mean())


HISTORY_COLUMNS = (["step", "pixel"] + [f"feature{k + 1}" for k in range(N_FEATURE_LAYERS)]
                   + ["decoder", "discriminator"] + [f"weight{k + 1}" for k in range(N_FEATURE_LAYERS)]
                   + ["images_per_s", "val_mse", "val_ssim", "baseline_mse"])


class History:
    """history.csv, appended to as training goes; survives restarts."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.columns = HISTORY_COLUMNS

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if not self.path.is_file():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c)) for c in self.columns])

    def truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint a resumed run restarts from."""
        if not (self.enabled and self.path.is_file()):
            return
        with open(self.path) as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, body = rows[0], [r for r in rows[1:] if r and int(float(r[0])) <= step]
        with open(self.path, "w", newline="") as handle:
            csv.writer(handle).writerows([header] + body)


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def fit(data_dir, run_dir, config: FitConfig | None = None, progress: bool = True,
        strategy=None) -> dict:
    """Train (or resume training) a decoder on a converted dataset; returns a summary.

    Re-running with the same RUN_DIR resumes from its latest checkpoint.
    """
    import keras
    import tensorflow as tf

    from cp2image_tf.training.strategy import choose_strategy, is_chief
    from cp2image_tf.viz import save_grid
    from tfrecords_tools.reader import make_dataset

    config = config or FitConfig()
    config.validate()
    manifest = load_manifest(data_dir)
    run_dir = Path(run_dir)
    check_run_dir(run_dir, manifest, config)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = strategy or choose_strategy(config.strategy)
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)

    # Non-chief workers write their (required) checkpoint copies to a scratch folder.
    write_dir = run_dir if chief else run_dir / f".worker-{strategy.cluster_resolver.task_id}"
    write_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        config.to_json(run_dir / "config.json")
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    trainer = Trainer(manifest, config, strategy)
    manager = tf.train.CheckpointManager(trainer.checkpoint, write_dir / "checkpoints",
                                         max_to_keep=config.keep_checkpoints)
    best_manager = tf.train.CheckpointManager(trainer.checkpoint, write_dir / "best", max_to_keep=1)
    latest = tf.train.latest_checkpoint(run_dir / "checkpoints")
    start_step = 0
    if latest:
        trainer.checkpoint.restore(latest).assert_existing_objects_matched()
        start_step = int(trainer.step.numpy())
        if chief and progress:
            print(f"Resuming from step {start_step} ({latest}).", file=sys.stderr)
    history = History(run_dir / "history.csv", chief)
    history.truncate_after(start_step)
    best_file = run_dir / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {"val_mse": math.inf}

    treatments = [t for t in manifest["treatments"]["names"]
                  if manifest["counts"]["treatments"]["train"].get(t)]
    stratify = {"yes": True, "no": False}.get(config.stratify, len(treatments) > 1)
    per_replica = config.batch_size // strategy.num_replicas_in_sync

    def dataset_fn(seed):
        def make(ctx):
            return make_dataset(data_dir, "train", per_replica, stratify=stratify, shuffle=True,
                                repeat=True, seed=seed, scaling=config.scaling,
                                normalization=config.normalization, input_context=ctx,
                                manifest=manifest)
        return make

    target_iter = iter(strategy.distribute_datasets_from_function(dataset_fn(config.seed)))
    real_iter = iter(strategy.distribute_datasets_from_function(dataset_fn(config.seed + 1)))

    val_feats, val_crops, val_treatments, val_ids, val_split = load_val_cells(
        data_dir, manifest, config, config.val_cells)
    mean_image = mean_training_image(data_dir, manifest, config)
    baseline_mse, baseline_ssim = pixel_metrics(np.broadcast_to(mean_image, val_crops.shape).copy(),
                                                val_crops)
    grid = grid_indices(val_treatments, config.grid_cells)
    writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
    if chief:
        (run_dir / "samples").mkdir(exist_ok=True)

    @tf.function
    def infer(features):
        return trainer.generate(features)

    def validate(step):
        generated = np.concatenate([infer(tf.constant(val_feats[i:i + 256])).numpy()
                                    for i in range(0, len(val_feats), 256)])
        mse, ssim = pixel_metrics(generated, val_crops)
        if chief and grid:
            rows = {"real": val_crops[grid], "generated": generated[grid]}
            labels = [f"{val_treatments[i]}\n{val_ids[i]}" for i in grid]
            title = (f"step {step}: {val_split} cells, val MSE {mse:.4f} "
                     f"(mean image {baseline_mse:.4f}), SSIM {ssim:.3f}")
            path = run_dir / "samples" / f"step_{step:07d}.png"
            save_grid(path, rows, manifest["channels"], labels, title)
            shutil.copyfile(path, run_dir / "samples" / "latest.png")
            with writer.as_default(step=step):
                pair = np.concatenate([rows["real"], rows["generated"]], axis=2)
                from cp2image_tf.viz import composite
                tf.summary.image("val/real_vs_generated", composite(pair, manifest["channels"]),
                                 max_outputs=len(grid))
        return mse, ssim

    step_fn = trainer.train_step_fn()
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=min(start_step, config.steps), unit="step",
               disable=not (chief and progress), file=sys.stderr, dynamic_ncols=True)
    step = start_step
    last_time, last_step = time.perf_counter(), step
    summary = {"start_step": start_step, "baseline_mse": baseline_mse, "baseline_ssim": baseline_ssim}
    try:
        if step == 0:
            mse, ssim = validate(0)
            history.write({"step": 0, "val_mse": mse, "val_ssim": ssim,
                           "baseline_mse": baseline_mse})
        while step < config.steps:
            losses = step_fn(target_iter, real_iter)
            step += 1
            bar.update(1)
            log_now = step % config.log_every == 0 or step == config.steps
            validate_now = step % config.validate_every == 0 or step == config.steps
            if log_now or validate_now:
                values = {k: float(v) for k, v in losses.items()}
                weights = trainer_weights(step - 1, config)
                row = {"step": step, **values, **weights}
            if log_now:
                now = time.perf_counter()
                rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                row["images_per_s"] = rate
                bar.set_postfix_str(f"pixel {values['pixel']:.1f} D {values['discriminator']:.3f} "
                                    f"{rate:.0f} img/s")
                if chief:
                    with writer.as_default(step=step):
                        for k, v in values.items():
                            tf.summary.scalar(f"loss/{k}", v)
                        for k, v in weights.items():
                            tf.summary.scalar(f"schedule/{k}", v)
                        tf.summary.scalar("perf/images_per_s", rate)
            if validate_now:
                mse, ssim = validate(step)
                row.update(val_mse=mse, val_ssim=ssim, baseline_mse=baseline_mse)
                if chief:
                    with writer.as_default(step=step):
                        tf.summary.scalar("val/pixel_mse", mse)
                        tf.summary.scalar("val/ssim", ssim)
                        tf.summary.scalar("val/mean_image_mse", baseline_mse)
                if mse < best["val_mse"]:
                    best_manager.save(checkpoint_number=step)
                    best = {"step": step, "val_mse": mse, "val_ssim": ssim}
                    if chief:
                        best_file.write_text(json.dumps(best, indent=1) + "\n")
                summary.update(val_mse=mse, val_ssim=ssim)
            if log_now or validate_now:
                history.write(row)
            if step % config.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
    finally:
        bar.close()
        if step > start_step and manager.latest_checkpoint != str(write_dir / "checkpoints" / f"ckpt-{step}"):
            manager.save(checkpoint_number=step)
        if writer is not None:
            writer.flush()
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    summary.update(steps=step, best=best, run_dir=str(run_dir),
                   weights_sha256=weights_digest(trainer.decoder, trainer.discriminator))
    return summary


def weights_digest(*models) -> str:
    """SHA-256 over every weight of the models: equal on every worker of a synchronous run."""
    import hashlib

    digest = hashlib.sha256()
    for model in models:
        for weight in model.weights:
            digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return digest.hexdigest()


def trainer_weights(step: int, config: FitConfig) -> dict:
    """The schedule weights in force at a step, for logs."""
    from cp2image_tf.training.losses import perceptual_weights

    weights = perceptual_weights(step, N_FEATURE_LAYERS, config.perceptual_delay,
                                 config.perceptual_slope).numpy()
    return {f"weight{k + 1}": float(w) for k, w in enumerate(weights)}
