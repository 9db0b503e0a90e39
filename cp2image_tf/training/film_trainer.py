"""Training the exemplar and film models: the measurer first, then decoder and critic together.

Phase 1, the measurer: a small CNN learns real training crops -> standardised
features (training split only: it reads the same training iterator as the
decoder), each batch shifted by up to measurer_jitter px. With measurer_views (the
exemplar model's default) each crop is seen as a random one of its eight turns and mirror
images, with the profile that view has (symmetry.py). It is then frozen.

Phase 2, decoder and critic update from the same forward pass every step:
    decoder loss = pixel_weight x mean squared error of pixel_pool x pixel_pool averages
                 + consistency_weight(t) x mean squared error between the measurer's
                   reading of the (shifted) generated crop and the input profile
                 + adversarial_weight(t) x hinge generator loss of the projection critic
                 + matching_weight(t) x mean |critic activations(generated) - (target)|
    critic loss  = hinge loss, the target crop with its own profile real, the generated
                   crop with the same profile fake.
The exemplar model (exemplar.py) trains the same way with pixel_weight 0 and three changes:
the consistency term compares the change of the measurer's reading from the exemplar to
the edit with the change of profile (relative_consistency),
    + anchor_weight x edit_size(the logit correction)
keeps the edit small and smooth, and in the identity share of each batch (the first
identity_share of its rows) the exemplar is the cell itself with its own profile:
    + identity_weight x mean |logit correction| there
asks for no edit when there is nothing to change, and the critic does not count those
rows as fakes. Without it, whatever the edits add regardless of the profile (a lifted
background, grain) goes unpunished: on the sample data five-minute runs with it kept the
features' share and moved the treatment means' r from 0.58 to 0.88 and KID from 2.9 to
0.1. Its measurer and critic also see log intensities.
pixel_pool and measurer_jitter are options, off by default. Compared as 4 x 4 averages,
pixels fix layout, size and brightness and leave the detail to the measurer and critic:
over five minutes that re-measured better (treatment accuracy 0.72 against 0.45), but the
decoder filled the 4 x 4 blocks with patterns that please the measurer, and over a longer
run it learned to game it outright (high-contrast stripes the critic did not stop). The
full-resolution pixel loss draws blurrier cells and never those.

The weights ramp in over fractions of the decoder's run (FitConfig.consistency_ramp,
adversarial_ramp), so a five-minute run uses every loss. The run's length is --steps,
or under --time-limit the steps expected from the first steps' speed, fixed once in
the checkpoint (total_steps).

Per-example losses are summed and divided by the global batch, so that the
gradients summed over replicas equal the single-device gradient.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from cp2image_tf.training.exemplar import FEATURE_CLIP, bank_layer
from cp2image_tf.training.film import build_critic, build_measurer
from cp2image_tf.training.config import FitConfig
from cp2image_tf.training.state import counter
from cp2image_tf.training.symmetry import random_views, view_maps
from tfrecords_tools.errors import UserInputError

LOSS_NAMES = ("pixel", "consistency", "adversarial", "matching", "anchor", "identity", "decoder",
              "critic")
WEIGHT_NAMES = ("w_consistency", "w_adversarial", "w_matching")


def ramp(progress, start: float, end: float):
    """0 before `start`, 1 after `end`, linear between (progress and bounds as run fractions)."""
    if end <= start:
        return tf.cast(progress >= start, tf.float32)
    return tf.clip_by_value((progress - start) / (end - start), 0.0, 1.0)


def pooled(images, size: int):
    """size x size average pooling (the identity for 1)."""
    if size <= 1:
        return images
    return tf.nn.avg_pool2d(images, size, size, "VALID")


def jitter(images, pixels: int):
    """The batch shifted by a random offset of up to `pixels` px (reflecting at the edges)."""
    if pixels <= 0:
        return images
    padded = tf.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels], [0, 0]], mode="REFLECT")
    return tf.image.random_crop(padded, tf.shape(images))


def edit_size(delta):
    """Per example: mean |delta| + mean |delta's x and y differences| of a logit correction.

    In logits, a relative change: a dim pixel counts as a bright one. The differences
    (total variation) keep the edit a field that moves structures, not pixel noise: an
    edit that roughened the background lifted CellProfiler's minimum and MAD intensities
    by several standard deviations while the critic saw nothing.
    """
    dy = tf.abs(delta[:, 1:] - delta[:, :-1])
    dx = tf.abs(delta[:, :, 1:] - delta[:, :, :-1])
    return (tf.reduce_mean(tf.abs(delta), [1, 2, 3]) + tf.reduce_mean(dy, [1, 2, 3])
            + tf.reduce_mean(dx, [1, 2, 3]))


def film_schedule(step, total_steps, config: FitConfig) -> dict:
    """The ramped loss weights at decoder step `step` of a run of `total_steps`."""
    progress = tf.cast(step, tf.float32) / tf.maximum(tf.cast(total_steps, tf.float32), 1.0)
    return {"w_consistency": config.consistency_weight * ramp(progress, 0.0, config.consistency_ramp),
            "w_adversarial": config.adversarial_weight * ramp(progress, *config.adversarial_ramp),
            "w_matching": config.matching_weight * ramp(progress, *config.adversarial_ramp)}


class FilmTrainer:
    """Decoder, measurer, critic, their optimisers, the step counters and the distributed steps."""

    needs_real_batch = False
    # Pixel MSE favours the blurred early decoder (on the sample data a 30-minute run's lowest
    # validation MSE was at step 500): best/ holds the latest validated checkpoint instead.
    best_by_pixel_mse = False
    loss_names = LOSS_NAMES
    weight_names = WEIGHT_NAMES

    def __init__(self, manifest: dict, config: FitConfig, strategy):
        import keras

        from cp2image_tf.training.networks import build_model_decoder

        self.manifest, self.config, self.strategy = manifest, config, strategy
        crop = manifest["crop"]
        self.n_features = manifest["features"]["count"]
        self.global_batch = config.batch_size
        if config.batch_size % strategy.num_replicas_in_sync:
            raise UserInputError(f"--batch-size {config.batch_size}: must divide evenly over "
                                 f"{strategy.num_replicas_in_sync} replicas.")
        size, channels = crop["height"], crop["channels"]
        with strategy.scope():
            if config.model == "exemplar":
                from cp2image_tf.training.networks import build_exemplar

                self.decoder, self.editor = build_exemplar(manifest, config)
            else:
                self.decoder, self.editor = build_model_decoder(manifest, config), None
            self.measurer = build_measurer(self.n_features, size, channels,
                                           log_view=config.log_view)
            self.critic = build_critic(self.n_features, size, channels, log_view=config.log_view)
            self.decoder_optimizer = keras.optimizers.Adam(config.decoder_lr, beta_1=0.5,
                                                           name="decoder_adam")
            self.critic_optimizer = keras.optimizers.Adam(config.discriminator_lr, beta_1=0.5,
                                                          name="critic_adam")
            self.measurer_optimizer = keras.optimizers.Adam(config.measurer_lr,
                                                            name="measurer_adam")
            self.decoder_optimizer.build(self.decoder.trainable_variables)
            self.critic_optimizer.build(self.critic.trainable_variables)
            self.measurer_optimizer.build(self.measurer.trainable_variables)
            self.step = counter("step")
            self.measurer_step = counter("measurer_step")
            self.measurer_done = counter("measurer_done")  # 1 once phase 1 has ended
            self.judge_done = counter("judge_done")  # judge rounds done (judge.py)
            # The decoder steps the judge rounds are spaced over (0: total_steps); under
            # --time-limit re-planned after each round, leaving the loss ramps' total_steps.
            self.judge_total = counter("judge_total")
            # The decoder steps the schedule is a fraction of (--steps, or the time budget's
            # expected length); in the checkpoint, so a resumed run keeps its schedule.
            self.total_steps = counter("total_steps", value=config.steps)
            self.elapsed = counter("elapsed", "float64")
            # Per feature, how far the consistency term trusts the measurer (set from its
            # validation r once it is trained; see set_reliability). In the checkpoint.
            self.reliability = tf.Variable(tf.ones([self.n_features]), trainable=False,
                                           name="reliability")
        self.views = None
        if config.measurer_views:
            sources, weights = view_maps(manifest["features"]["names"],
                                         square=crop["height"] == crop["width"])
            self.views = (tf.constant(sources, tf.int32), tf.constant(weights, tf.float32))
        self.models = (self.decoder, self.critic, self.measurer)
        self.checkpoint = tf.train.Checkpoint(
            decoder=self.decoder, critic=self.critic, measurer=self.measurer,
            decoder_optimizer=self.decoder_optimizer, critic_optimizer=self.critic_optimizer,
            measurer_optimizer=self.measurer_optimizer, step=self.step,
            measurer_step=self.measurer_step, measurer_done=self.measurer_done,
            total_steps=self.total_steps,
            elapsed=self.elapsed, reliability=self.reliability,
            # The exemplar picks' random state: a resumed run picks what the uninterrupted
            # one would have.
            **({"exemplar_picks": bank_layer(self.decoder).seed_generator.state}
               if self.editor is not None else {}),
            # Only with judge rounds: run folders without them resume as before.
            **({"judge_done": self.judge_done, "judge_total": self.judge_total}
               if config.judge_rounds else {}))
        self.judge_optimizer = None
        self._steps = {}

    # -- inputs ---------------------------------------------------------------------------
    def decoder_inputs(self, features, training: bool = True):
        features = tf.convert_to_tensor(features, tf.float32)
        if not self.config.noise_dim:
            return features
        shape = [tf.shape(features)[0], self.config.noise_dim]
        noise = tf.random.normal(shape) if training else tf.zeros(shape)
        return [features, noise]

    def generate(self, features):
        """Images in [0, 1] from normalised features, inference mode."""
        return self.decoder(self.decoder_inputs(features, training=False), training=False)

    # -- phase 1: the measurer --------------------------------------------------------------
    def measurer_replica_step(self, features, crops):
        target = tf.clip_by_value(features, -FEATURE_CLIP, FEATURE_CLIP)
        weights = tf.ones_like(target)
        if self.views is not None:
            # A fresh view of each crop every step, the same ones on a resumed run.
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            seed = tf.stack([tf.cast(self.config.seed, tf.int64),
                             tf.cast(self.measurer_step, tf.int64) * 1024 + tf.cast(replica, tf.int64)])
            crops, target, weights = random_views(crops, target, *self.views, seed)
        with tf.GradientTape() as tape:
            predicted = self.measurer(jitter(crops, self.config.measurer_jitter), training=True)
            per_example = tf.reduce_mean(weights * tf.square(predicted - target), axis=1)
            loss = tf.reduce_sum(per_example) / self.global_batch
        grads = tape.gradient(loss, self.measurer.trainable_variables)
        self.measurer_optimizer.apply_gradients(zip(grads, self.measurer.trainable_variables))
        return {"measurer": loss}

    # -- judge rounds (judge.py) ----------------------------------------------------------
    def judge_edits(self, features):
        """(edits, their exemplar crops, the exemplars' features) of clipped standardised
        training features, drawn as training draws them: each an edit of one of its nearest
        bank cells, not itself."""
        exemplar, exemplar_features, _ = bank_layer(self.decoder)(features, training=True)
        inputs = self.decoder_inputs(features, training=False)
        edits, _ = self.editor([*(inputs if isinstance(inputs, list) else [inputs]), exemplar,
                                exemplar_features], training=False)
        return edits, exemplar, exemplar_features

    def judge_replica_step(self, features, crops, edits, labels, weights, seed):
        """One measurer step on real crops (their profiles) and judge-labelled edits, each in a
        random view; the two halves' losses are summed over the global batch."""
        target = tf.clip_by_value(features, -FEATURE_CLIP, FEATURE_CLIP)
        view_weights = tf.ones_like(target)
        edit_views = tf.ones_like(labels)
        if self.views is not None:
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
            seed = seed + tf.stack([tf.constant(0, tf.int64), 2048 * replica])
            crops, target, view_weights = random_views(crops, target, *self.views, seed)
            # Labels and their weights move together: the view's sources gather both.
            edits, both, edit_views = random_views(edits, tf.stack([labels, weights], -1),
                                                   *self.views, seed + tf.constant([0, 1], tf.int64))
            labels, weights = both[..., 0], both[..., 1]
        with tf.GradientTape() as tape:
            real = tf.reduce_mean(view_weights * tf.square(self.measurer(crops, training=True)
                                                           - target), axis=1)
            judged = tf.reduce_mean(edit_views * weights * tf.square(
                self.measurer(edits, training=True) - labels), axis=1)
            loss = (tf.reduce_sum(real) + tf.reduce_sum(judged)) / self.global_batch
        grads = tape.gradient(loss, self.measurer.trainable_variables)
        self.judge_optimizer.apply_gradients(zip(grads, self.measurer.trainable_variables))
        return {"judge": loss}

    def judge_step_fn(self):
        """A tf.function: (real batches' iterator, labelled edits' iterator, seed [2]) ->
        {"judge": loss}."""
        if "judge" in self._steps:
            return self._steps["judge"]
        import keras

        strategy = self.strategy
        with strategy.scope():
            self.judge_optimizer = keras.optimizers.Adam(self.config.judge_lr, name="judge_adam")
            self.judge_optimizer.build(self.measurer.trainable_variables)

        @tf.function
        def step(real_iterator, edit_iterator, seed):
            features, crops = next(real_iterator)
            edits, labels, weights = next(edit_iterator)
            per_replica = strategy.run(self.judge_replica_step,
                                       args=(features, crops, edits, labels, weights, seed))
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for k, v in per_replica.items()}

        self._steps["judge"] = step
        return step

    def set_reliability(self, r, keep: bool = True) -> None:
        """Weight each feature's consistency error by the measurer's validation r^2 (0 for
        r <= 0 or undefined: None or NaN, as measurer_report gives it), scaled to a mean of
        1; all ones when the config says not to.

        A feature the measurer cannot read is one its reading of an edit answers to
        anything but the feature: on the sample data the features a 30-minute run pushed
        furthest from real cells (Cells MinIntensity_DNA +8 SD, MinIntensityEdge_DNA +5.6)
        were ones it read at r 0.01-0.04. keep: r is the measurer's r on real crops, kept for
        the judge rounds (which set the weights again from it and their edits, keep=False)."""
        if keep:
            self.reliability_r = list(r)  # the real-crop r, for the judge rounds (judge.py)
        weights = np.ones(self.n_features, np.float32)
        if self.config.reliability_weighted:
            squared = np.clip(defined_r(r), 0.0, 1.0) ** 2
            if squared.sum() > 0:
                weights = (squared / squared.mean()).astype(np.float32)
        self.reliability.assign(weights)

    # -- phase 2: decoder and critic ------------------------------------------------------
    def losses_and_gradients(self, features, target):
        cfg = self.config
        n = tf.shape(target)[0]
        weights = film_schedule(self.step, self.total_steps, cfg)
        # The exemplar model's identity share: rows whose exemplar is the cell itself, with its
        # own profile. Their edit should be none; the critic does not see them as fakes.
        share = cfg.identity_share if self.editor is not None else 0.0
        identity = tf.range(n) < tf.cast(tf.round(share * tf.cast(n, tf.float32)), tf.int32)
        fake = 1.0 - tf.cast(identity, tf.float32)
        with tf.GradientTape(persistent=True) as tape:
            if self.editor is not None:
                exemplar, exemplar_features, asked = bank_layer(self.decoder)(features,
                                                                              training=True)
                exemplar = tf.where(identity[:, None, None, None], target, exemplar)
                exemplar_features = tf.where(identity[:, None], asked, exemplar_features)
                inputs = self.decoder_inputs(features)
                generated, delta = self.editor(
                    [*(inputs if isinstance(inputs, list) else [inputs]), exemplar,
                     exemplar_features], training=True)
            else:
                generated = self.decoder(self.decoder_inputs(features), training=True)
            generated = tf.cast(generated, tf.float32)
            both = tf.concat([target, generated], 0)
            logit, *activations = self.critic([both, tf.concat([features, features], 0)],
                                              training=True)
            real_logit, fake_logit = logit[:n], logit[n:]
            batch = float(self.global_batch)
            pixel = tf.reduce_sum(tf.reduce_mean(tf.square(
                pooled(generated, cfg.pixel_pool) - pooled(target, cfg.pixel_pool)), [1, 2, 3])) / batch
            measured = self.measurer(jitter(generated, cfg.measurer_jitter), training=False)
            clipped = tf.clip_by_value(features, -FEATURE_CLIP, FEATURE_CLIP)
            if self.editor is not None and cfg.relative_consistency:
                # The reading must move from the exemplar's by the profile's difference: the
                # measurer's own error on the exemplar is not the edit's business.
                start = self.measurer(exemplar, training=False)
                measured = measured - start + exemplar_features
            consistency = tf.reduce_sum(tf.reduce_mean(
                self.reliability * tf.square(measured - clipped), 1)) / batch
            if self.editor is not None:
                delta = tf.cast(delta, tf.float32)
                anchor = tf.reduce_sum(edit_size(delta)) / batch
                unchanged = tf.reduce_sum((1.0 - fake) * tf.reduce_mean(tf.abs(delta), [1, 2, 3])) / batch
            else:
                anchor = unchanged = tf.zeros(())
            adversarial = -tf.reduce_sum(fake * fake_logit[:, 0]) / batch
            matching = tf.add_n([
                tf.reduce_sum(fake * tf.reduce_mean(tf.abs(a[n:] - tf.stop_gradient(a[:n])),
                                                    axis=list(range(1, a.shape.rank)))) / batch
                for a in activations])
            decoder_loss = (cfg.pixel_weight * pixel + weights["w_consistency"] * consistency
                            + weights["w_adversarial"] * adversarial
                            + weights["w_matching"] * matching + cfg.anchor_weight * anchor
                            + cfg.identity_weight * unchanged)
            critic_loss = (tf.reduce_sum(tf.nn.relu(1.0 - real_logit))
                           + tf.reduce_sum(fake * tf.nn.relu(1.0 + fake_logit[:, 0]))) / batch
        decoder_grads = tape.gradient(decoder_loss, self.decoder.trainable_variables)
        critic_grads = tape.gradient(critic_loss, self.critic.trainable_variables)
        del tape
        losses = {"pixel": pixel, "consistency": consistency, "adversarial": adversarial,
                  "matching": matching, "anchor": anchor, "identity": unchanged, "decoder": decoder_loss,
                  "critic": critic_loss}
        return losses, decoder_grads, critic_grads

    def replica_step(self, features, target):
        compiled = self._steps.get("gradients")
        if compiled is None:
            # XLA fuses forward and backward on one device; with several replicas the
            # synchronised batch norm all-reduces, which a nested tf.function cannot do.
            compiled = (tf.function(self.losses_and_gradients, jit_compile=True)
                        if self.config.jit_compile and self.strategy.num_replicas_in_sync == 1
                        else self.losses_and_gradients)
            self._steps["gradients"] = compiled
        losses, decoder_grads, critic_grads = compiled(features, target)
        self.decoder_optimizer.apply_gradients(zip(decoder_grads, self.decoder.trainable_variables))
        self.critic_optimizer.apply_gradients(zip(critic_grads, self.critic.trainable_variables))
        return losses

    # -- distributed steps ----------------------------------------------------------------
    def _distributed(self, key, replica_fn, counter):
        if key in self._steps:
            return self._steps[key]
        strategy = self.strategy

        @tf.function
        def step(iterator):
            features, crops = next(iterator)
            per_replica = strategy.run(replica_fn, args=(features, crops))
            losses = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                      for k, v in per_replica.items()}
            counter.assign_add(1)
            return losses

        self._steps[key] = step
        return step

    def measurer_step_fn(self):
        """A tf.function: (iterator) -> {"measurer": loss}; advances measurer_step."""
        return self._distributed("measurer", self.measurer_replica_step, self.measurer_step)

    def train_step_fn(self):
        """A tf.function: (iterator) -> global loss terms; advances the decoder step."""
        return self._distributed("train", self.replica_step, self.step)

    def schedule_weights(self, step: int) -> dict:
        """The schedule's weights at a decoder step, for logs."""
        return {k: float(v) for k, v in
                film_schedule(step, int(self.total_steps.numpy()), self.config).items()}


def read_features(measurer, crops: np.ndarray) -> np.ndarray:
    """The measurer's reading [N, F] of crops [N, H, W, C], 256 at a time."""
    return np.concatenate([measurer(crops[i:i + 256], training=False).numpy()
                           for i in range(0, len(crops), 256)])


def defined_r(r) -> np.ndarray:
    """Per-feature r as measurer_report gives it (None or NaN where undefined) as float64,
    0 where undefined."""
    return np.nan_to_num(np.array([np.nan if v is None else v for v in r], np.float64))


def measurer_report(measurer, crops: np.ndarray, features: np.ndarray, names) -> dict:
    """The measurer's validation r per feature, summarised per module (it cannot teach what it
    cannot read): {"median_r", "fraction_r_0.7", "modules": {module: {...}}}, as evaluate
    summarises re-measured features (NaN r counts as 0)."""
    import pandas as pd

    from cp2image_tf.metrics import feature_correlations, module_summary

    predicted = read_features(measurer, crops)
    target = np.clip(features, -FEATURE_CLIP, FEATURE_CLIP)
    r = feature_correlations(pd.DataFrame(target, columns=names),
                             pd.DataFrame(predicted, columns=names), min_cells=2)
    table = module_summary({"measurer": r}).set_index("module")
    per_feature = [None if not np.isfinite(v) else float(v)
                   for v in r["pearson"].reindex(list(names)).to_numpy()]
    modules = {m: {"features": int(row.n_features), "median_r": float(row.median_r),
                   "fraction_r_0.7": float(row.fraction)}
               for m, row in table.iterrows() if m != "all"}
    return {"cells": int(len(crops)), "median_r": float(table.loc["all", "median_r"]),
            "fraction_r_0.7": float(table.loc["all", "fraction"]), "modules": modules,
            "r": per_feature}
