"""The exemplar model's trainer (the default): the shared measurer-and-critic training
(shared/critic_trainer.py) of an editor that moves the nearest bank cell to the asked profile.

It needs no pixel loss to the paired crop, which would pull the edit towards the blurred
average: the measurer's reading of the edit must move from its reading of the exemplar by the
asked profile's difference (relative_consistency), the projection critic keeps the picture a
real cell of that profile, and two terms of its own:
    + anchor_weight x edit_size(the logit correction)
keeps the edit small and smooth, and in the identity share of each batch (the first
identity_share of its rows) the exemplar is the cell itself with its own profile:
    + identity_weight x mean |logit correction| there
asks for no edit when there is nothing to change, and the critic does not count those rows
as fakes. Every edit's size and shape, read by a differentiable segmentation
(geometry.py), must move from its exemplar's as the profile asks:
    + geometry_weight x mean squared (the reading's change - the asked change), in SDs
where the measurer alone is pleased by a nucleus dimmed instead of grown.
Why each term, with the runs that decided it: docs/design/exemplar.md.

Before its steps the bank is filled from the training split; the judge rounds
(shared/judge.py) teach the measurer how cp-measure reads the edits.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from cp2image_tf.tflog import quiet_first_call
from cp2image_tf.training.exemplar.bank import bank_layer
from cp2image_tf.training.exemplar.geometry import shape_readings
from cp2image_tf.training.shared.critic_trainer import CriticTrainer
from cp2image_tf.training.shared.measurer import FEATURE_CLIP
from cp2image_tf.training.shared.symmetry import random_views
from cp2image_tf.training.state import counter


def edit_size(delta):
    """Per example: mean |delta| + mean |delta's x and y differences| of a logit correction.

    In logits, a relative change: a dim pixel counts as a bright one. The differences
    (total variation) keep the edit a field that moves structures, not pixel noise that
    lifts CellProfiler's dim-level features while the critic sees nothing
    (docs/design/exemplar.md).
    """
    dy = tf.abs(delta[:, 1:] - delta[:, :-1])
    dx = tf.abs(delta[:, :, 1:] - delta[:, :, :-1])
    return (tf.reduce_mean(tf.abs(delta), [1, 2, 3]) + tf.reduce_mean(dy, [1, 2, 3])
            + tf.reduce_mean(dx, [1, 2, 3]))


class ExemplarTrainer(CriticTrainer):
    """The exemplar decoder and its editor, the measurer, the critic and the judge's steps."""

    def build_decoder(self):
        from cp2image_tf.training.exemplar.networks import build_exemplar_networks

        crop, ex = self.manifest["crop"], self.settings
        decoder, self.editor = build_exemplar_networks(
            self.n_features, crop["height"], crop["channels"], noise_dim=self.config.noise_dim,
            width=ex.filters, bank=ex.bank, top_k=ex.top_k, seed=self.config.seed,
            views=ex.views, warp=ex.warp,
            training_cells=self.manifest["counts"]["splits"]["train"])
        return decoder

    def make_counters(self) -> None:
        super().make_counters()
        self.judge_done = counter("judge_done")  # judge rounds done (judge.py)
        # The decoder steps the judge rounds are spaced over (0: total_steps); under
        # --time-limit re-planned after each round, leaving the loss ramps' total_steps.
        self.judge_total = counter("judge_total")
        self.judge_optimizer = None
        self.geometry = None  # the size-and-shape reading, fitted before the steps

    def checkpointed(self) -> dict:
        # The exemplar picks' random state: a resumed run picks what the uninterrupted one
        # would have. The judge's counters only with judge rounds: run folders without them
        # resume as before.
        return {"exemplar_picks": bank_layer(self.decoder).seed_generator.state,
                **({"judge_done": self.judge_done, "judge_total": self.judge_total}
                   if self.config.judge_rounds else {})}

    # -- the loop's hooks ---------------------------------------------------------------------
    def before_steps(self, run) -> None:
        """Fill the bank (a new run), then the measurer's phase."""
        from cp2image_tf.training.exemplar.bank import fill_bank

        bank = bank_layer(self.decoder)
        if not float(bank.filled.numpy()):
            run.summary["exemplars"] = fill_bank(self.decoder, run.data_dir, run.manifest,
                                                 run.config)
        else:
            run.summary["exemplars"] = bank.size
        self.geometry = self.fit_geometry(run) if self.settings.geometry_weight > 0 else None
        super().before_steps(run)

    def fit_geometry(self, run):
        """The size-and-shape reading (geometry.py) fitted on the bank's first cells."""
        from cp2image_tf.measuring.remeasure import dataset_segmentation, plan_measurement
        from cp2image_tf.training.exemplar.geometry import fit_geometry
        from tfrecords_tools.manifest import measured_names

        bank = bank_layer(self.decoder)
        count = min(bank.size, 1024)
        crops = bank.crops[:count].numpy().astype(np.float32)
        features = bank.bank_features().numpy()[:count]
        names, channels = run.manifest["features"]["names"], measured_names(run.manifest)
        roles = plan_measurement(names, channels).objects
        segmentation, _ = dataset_segmentation(run.manifest, crops, run.config.scaling, roles)
        return fit_geometry(crops, features, names, roles, segmentation,
                            channels if self.settings.intensity_readings else ())

    def judge_rounds(self, run):
        if not self.config.judge_rounds:
            return None
        from cp2image_tf.training.shared.judge import JudgeRounds

        return JudgeRounds(self, run.batches, run.data_dir, run.manifest, run.config,
                           run.run_dir, run.chief, run.progress)

    # -- phase 2 ------------------------------------------------------------------------------
    def draw_for_training(self, features, target):
        """Each row an edit of a bank cell near its profile; in the identity share, of the
        cell itself with its own profile."""
        n = tf.shape(target)[0]
        share = self.settings.identity_share
        identity = tf.range(n) < tf.cast(tf.round(share * tf.cast(n, tf.float32)), tf.int32)
        exemplar, exemplar_features, asked = bank_layer(self.decoder)(features, training=True)
        exemplar = tf.where(identity[:, None, None, None], target, exemplar)
        exemplar_features = tf.where(identity[:, None], asked, exemplar_features)
        inputs = self.decoder_inputs(features)
        generated, delta = self.editor(
            [*(inputs if isinstance(inputs, list) else [inputs]), exemplar, exemplar_features],
            training=True)
        return generated, (identity, asked, exemplar, exemplar_features, delta, generated)

    def model_terms(self, measured, drawn, batch: float):
        identity, clipped, exemplar, exemplar_features, delta, generated = drawn
        ex = self.settings
        fake = 1.0 - tf.cast(identity, tf.float32)
        if ex.relative_consistency:
            # The reading must move from the exemplar's by the profile's difference: the
            # measurer's own error on the exemplar is not the edit's business.
            start = self.measurer(exemplar, training=False)
            measured = measured - start + exemplar_features
        delta = tf.cast(delta, tf.float32)
        anchor = tf.reduce_sum(edit_size(delta)) / batch
        unchanged = tf.reduce_sum((1.0 - fake) * tf.reduce_mean(tf.abs(delta), [1, 2, 3])) / batch
        return measured, {"anchor": (anchor, ex.anchor_weight),
                          "identity": (unchanged, ex.identity_weight),
                          "geometry": (self.geometry_term(generated, exemplar,
                                                          clipped - exemplar_features, fake,
                                                          batch), ex.geometry_weight)}, fake

    def geometry_term(self, generated, exemplar, asked_change, fake, batch: float):
        """Over the edits (not the identity rows): the mean squared difference between how far
        the size-and-shape reading (geometry.py) moved from the exemplar's and how far the
        profile asks, in SDs. Zero without a reading."""
        geometry = self.geometry
        if geometry is None:
            return tf.zeros(())
        drawn = (shape_readings(tf.cast(generated, tf.float32), geometry)
                 - shape_readings(tf.cast(exemplar, tf.float32), geometry))
        asked = tf.gather(asked_change, geometry.features, axis=1)
        return tf.reduce_sum(fake * tf.reduce_mean(tf.square(drawn - asked), 1)) / batch

    # -- judge rounds (shared/judge.py) -------------------------------------------------------
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
            self.judge_optimizer = keras.optimizers.Adam(self.config.judge.lr, name="judge_adam")
            self.judge_optimizer.build(self.measurer.trainable_variables)

        @tf.function
        def step(real_iterator, edit_iterator, seed):
            features, crops = next(real_iterator)
            edits, labels, weights = next(edit_iterator)
            per_replica = strategy.run(self.judge_replica_step,
                                       args=(features, crops, edits, labels, weights, seed))
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for k, v in per_replica.items()}

        self._steps["judge"] = quiet_first_call(step)  # grappler's harmless line (tflog)
        return self._steps["judge"]
