"""Training against a measurer and a critic: what the exemplar and film trainers share.

Phase 1, the measurer (shared/measurer.py): a small CNN learns real training crops ->
standardised features (training split only: it reads the same training iterator as the
decoder). With measurer_views each crop is seen as a random one of its eight turns and mirror
images, with the profile that view has (symmetry.py). It is then frozen.

Phase 2, decoder and critic update from the same forward pass every step:
    decoder loss = pixel_weight x mean squared error to the paired crop
                 + consistency_weight(t) x mean squared error between the measurer's
                   reading of the generated crop and the input profile
                 + adversarial_weight(t) x hinge generator loss of the projection critic
                 + matching_weight(t) x mean |critic activations(generated) - (target)|
                 + the model's own terms (model_terms: the exemplar model's anchor,
                   identity and geometry terms; none for the film decoder)
    critic loss  = hinge loss, the target crop with its own profile real, the generated
                   crop with the same profile fake.
A subclass draws the training batch (draw_for_training) and adds its terms (model_terms).
Why these losses and weights: docs/design/exemplar.md and docs/design/film.md.

The weights ramp in over fractions of the decoder's run (consistency_ramp, adversarial_ramp
of the model's section), so a five-minute run uses every loss. The run's length is --steps,
or under --time-limit the steps expected from the first steps' speed, fixed once in the
checkpoint (total_steps).

Per-example losses are summed and divided by the global batch, so that the gradients summed
over replicas equal the single-device gradient.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from cp2image_tf.tflog import quiet_first_call
from cp2image_tf.training.shared.critic import build_critic
from cp2image_tf.training.shared.measurer import FEATURE_CLIP, build_measurer, defined_r
from cp2image_tf.training.shared.symmetry import random_views, view_maps
from cp2image_tf.training.state import counter
from tfrecords_tools.errors import UserInputError

LOSS_NAMES = ("pixel", "consistency", "adversarial", "matching", "anchor", "identity", "geometry",
              "decoder", "critic")
WEIGHT_NAMES = ("w_consistency", "w_adversarial", "w_matching")


def ramp(progress, start: float, end: float):
    """0 before `start`, 1 after `end`, linear between (progress and bounds as run fractions)."""
    if end <= start:
        return tf.cast(progress >= start, tf.float32)
    return tf.clip_by_value((progress - start) / (end - start), 0.0, 1.0)


def loss_schedule(step, total_steps, settings) -> dict:
    """The ramped loss weights at decoder step `step` of a run of `total_steps` (settings: the
    model's section)."""
    progress = tf.cast(step, tf.float32) / tf.maximum(tf.cast(total_steps, tf.float32), 1.0)
    return {"w_consistency": settings.consistency_weight * ramp(progress, 0.0,
                                                                settings.consistency_ramp),
            "w_adversarial": settings.adversarial_weight * ramp(progress,
                                                                *settings.adversarial_ramp),
            "w_matching": settings.matching_weight * ramp(progress, *settings.adversarial_ramp)}


class CriticTrainer:
    """Decoder, measurer, critic, their optimisers, the step counters and the distributed
    steps; a subclass builds the decoder (build_decoder) and draws with it."""

    needs_real_batch = False
    # best/ holds the latest validated checkpoint: pixel MSE favours the blurred early
    # decoder (docs/design/film.md).
    best_by_pixel_mse = False
    loss_names = LOSS_NAMES
    weight_names = WEIGHT_NAMES
    pixel_weight = 0.0

    def __init__(self, manifest: dict, config, strategy):
        import keras

        self.manifest, self.config, self.strategy = manifest, config, strategy
        self.settings = config.section
        crop = manifest["crop"]
        self.n_features = manifest["features"]["count"]
        self.global_batch = config.batch_size
        if config.batch_size % strategy.num_replicas_in_sync:
            raise UserInputError(f"--batch-size {config.batch_size}: must divide evenly over "
                                 f"{strategy.num_replicas_in_sync} replicas.")
        size, channels = crop["height"], crop["channels"]
        with strategy.scope():
            self.decoder = self.build_decoder()
            self.measurer = build_measurer(self.n_features, size, channels,
                                           log_view=self.settings.log_view)
            self.critic = build_critic(self.n_features, size, channels,
                                       log_view=self.settings.log_view)
            self.decoder_optimizer = keras.optimizers.Adam(self.settings.decoder_lr, beta_1=0.5,
                                                           name="decoder_adam")
            self.critic_optimizer = keras.optimizers.Adam(self.settings.critic_lr, beta_1=0.5,
                                                          name="critic_adam")
            self.measurer_optimizer = keras.optimizers.Adam(config.measurer.lr,
                                                            name="measurer_adam")
            self.decoder_optimizer.build(self.decoder.trainable_variables)
            self.critic_optimizer.build(self.critic.trainable_variables)
            self.measurer_optimizer.build(self.measurer.trainable_variables)
            self.make_counters()
        self.views = None
        if self.settings.measurer_views:
            sources, weights = view_maps(manifest["features"]["names"],
                                         square=crop["height"] == crop["width"])
            self.views = (tf.constant(sources, tf.int32), tf.constant(weights, tf.float32))
        self.models = (self.decoder, self.critic, self.measurer)
        self.checkpoint = tf.train.Checkpoint(
            decoder=self.decoder, critic=self.critic, measurer=self.measurer,
            decoder_optimizer=self.decoder_optimizer, critic_optimizer=self.critic_optimizer,
            measurer_optimizer=self.measurer_optimizer, step=self.step,
            measurer_step=self.measurer_step, measurer_done=self.measurer_done,
            total_steps=self.total_steps, elapsed=self.elapsed, reliability=self.reliability,
            **self.checkpointed())
        self._steps = {}

    def make_counters(self) -> None:
        """The step counters and the consistency's per-feature weights (in the strategy's
        scope)."""
        self.step = counter("step")
        self.measurer_step = counter("measurer_step")
        self.measurer_done = counter("measurer_done")  # 1 once phase 1 has ended
        # The decoder steps the schedule is a fraction of (--steps, or the time budget's
        # expected length); in the checkpoint, so a resumed run keeps its schedule.
        self.total_steps = counter("total_steps", value=self.config.steps)
        self.elapsed = counter("elapsed", "float64")
        # Per feature, how far the consistency term trusts the measurer (set from its
        # validation r once it is trained; see set_reliability). In the checkpoint.
        self.reliability = tf.Variable(tf.ones([self.n_features]), trainable=False,
                                       name="reliability")

    # -- what a model adds ------------------------------------------------------------------
    def build_decoder(self):
        """The decoder (features -> image), built in the strategy's scope."""
        raise NotImplementedError

    def checkpointed(self) -> dict:
        """The model's own objects in the checkpoint, beside the shared ones."""
        return {}

    def draw_for_training(self, features, target):
        """(generated batch, what model_terms needs of the draw) in training mode."""
        raise NotImplementedError

    def model_terms(self, measured, drawn, batch: float):
        """(the measurer's reading as the consistency compares it, the model's own decoder
        loss terms and their weights: {name: (value, weight)}), and the per-example weight of
        each row as a fake for the critic."""
        raise NotImplementedError

    # -- the loop's hooks (trainer.Trainer) ---------------------------------------------------
    def before_steps(self, run) -> None:
        from cp2image_tf.training.shared.measurer import measurer_phase

        measurer_phase(self, run)

    def judge_rounds(self, run):
        return None

    # -- inputs -------------------------------------------------------------------------------
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

    # -- phase 1: the measurer ----------------------------------------------------------------
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
            predicted = self.measurer(crops, training=True)
            per_example = tf.reduce_mean(weights * tf.square(predicted - target), axis=1)
            loss = tf.reduce_sum(per_example) / self.global_batch
        grads = tape.gradient(loss, self.measurer.trainable_variables)
        self.measurer_optimizer.apply_gradients(zip(grads, self.measurer.trainable_variables))
        return {"measurer": loss}

    def set_reliability(self, r, keep: bool = True) -> None:
        """Weight each feature's consistency error by the measurer's validation r^2 (0 for
        r <= 0 or undefined: None or NaN, as measurer_report gives it), scaled to a mean of
        1; all ones when the model's settings say not to (reliability_weighted).

        A feature the measurer cannot read is one its reading of an edit answers to anything
        but the feature (docs/design/measurer-and-judge.md). keep: r is the measurer's r on
        real crops, kept for the judge rounds (which set the weights again from it and their
        edits, keep=False)."""
        if keep:
            self.reliability_r = list(r)  # the real-crop r, for the judge rounds (judge.py)
        weights = np.ones(self.n_features, np.float32)
        if self.settings.reliability_weighted:
            squared = np.clip(defined_r(r), 0.0, 1.0) ** 2
            if squared.sum() > 0:
                weights = (squared / squared.mean()).astype(np.float32)
        self.reliability.assign(weights)

    # -- phase 2: decoder and critic ----------------------------------------------------------
    def losses_and_gradients(self, features, target):
        n = tf.shape(target)[0]
        weights = loss_schedule(self.step, self.total_steps, self.settings)
        batch = float(self.global_batch)
        with tf.GradientTape(persistent=True) as tape:
            generated, drawn = self.draw_for_training(features, target)
            generated = tf.cast(generated, tf.float32)
            both = tf.concat([target, generated], 0)
            logit, *activations = self.critic([both, tf.concat([features, features], 0)],
                                              training=True)
            real_logit, fake_logit = logit[:n], logit[n:]
            pixel = tf.reduce_sum(tf.reduce_mean(tf.square(generated - target), [1, 2, 3])) / batch
            measured = self.measurer(generated, training=False)
            measured, terms, fake = self.model_terms(measured, drawn, batch)
            clipped = tf.clip_by_value(features, -FEATURE_CLIP, FEATURE_CLIP)
            consistency = tf.reduce_sum(tf.reduce_mean(
                self.reliability * tf.square(measured - clipped), 1)) / batch
            adversarial = -tf.reduce_sum(fake * fake_logit[:, 0]) / batch
            matching = tf.add_n([
                tf.reduce_sum(fake * tf.reduce_mean(tf.abs(a[n:] - tf.stop_gradient(a[:n])),
                                                    axis=list(range(1, a.shape.rank)))) / batch
                for a in activations])
            decoder_loss = (self.pixel_weight * pixel + weights["w_consistency"] * consistency
                            + weights["w_adversarial"] * adversarial
                            + weights["w_matching"] * matching)
            for value, weight in terms.values():
                decoder_loss = decoder_loss + weight * value
            critic_loss = (tf.reduce_sum(tf.nn.relu(1.0 - real_logit))
                           + tf.reduce_sum(fake * tf.nn.relu(1.0 + fake_logit[:, 0]))) / batch
        decoder_grads = tape.gradient(decoder_loss, self.decoder.trainable_variables)
        critic_grads = tape.gradient(critic_loss, self.critic.trainable_variables)
        del tape
        losses = {"pixel": pixel, "consistency": consistency, "adversarial": adversarial,
                  "matching": matching, **{k: v for k, (v, _) in terms.items()},
                  "decoder": decoder_loss, "critic": critic_loss}
        return losses, decoder_grads, critic_grads

    def replica_step(self, features, target):
        compiled = self._steps.get("gradients")
        if compiled is None:
            # XLA fuses forward and backward on one device; with several replicas the
            # synchronised batch norm all-reduces, which a nested tf.function cannot do.
            compiled = (tf.function(self.losses_and_gradients, jit_compile=True)
                        if self.settings.jit_compile and self.strategy.num_replicas_in_sync == 1
                        else self.losses_and_gradients)
            self._steps["gradients"] = compiled
        losses, decoder_grads, critic_grads = compiled(features, target)
        self.decoder_optimizer.apply_gradients(zip(decoder_grads, self.decoder.trainable_variables))
        self.critic_optimizer.apply_gradients(zip(critic_grads, self.critic.trainable_variables))
        return losses

    # -- distributed steps --------------------------------------------------------------------
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

        # Its first call is where grappler prints its harmless remapper line (tflog).
        self._steps[key] = quiet_first_call(step)
        return self._steps[key]

    def measurer_step_fn(self):
        """A tf.function: (iterator) -> {"measurer": loss}; advances measurer_step."""
        return self._distributed("measurer", self.measurer_replica_step, self.measurer_step)

    def train_step_fn(self):
        """A tf.function: (iterator) -> global loss terms; advances the decoder step."""
        return self._distributed("train", self.replica_step, self.step)

    def schedule_weights(self, step: int) -> dict:
        """The schedule's weights at a decoder step, for logs."""
        return {k: float(v) for k, v in
                loss_schedule(step, int(self.total_steps.numpy()), self.settings).items()}
