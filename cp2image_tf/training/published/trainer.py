"""The published model's training step: decoder and discriminator from one forward pass.

Both networks update from the same forward pass every step, as published (Ji et al.
2024): the decoder from the pixel loss plus the scheduled feature losses (the
discriminator's activations for the generated cell vs its target), the discriminator
from its cross-entropy on an independent real batch vs the generated cells. Weight
decay multiplies every kernel by (1 - 1e-4) after each step.
"""
from __future__ import annotations

import numpy as np

from cp2image_tf.training.state import counter
from tfrecords_tools.errors import UserInputError

N_FEATURE_LAYERS = 4


class PublishedTrainer:
    """The published model: the two networks, their optimisers, the step counter and the
    distributed step."""

    needs_real_batch = True
    total_steps = None  # its schedule counts steps: nothing to plan under --time-limit
    best_by_pixel_mse = True  # best/ holds the checkpoint of lowest validation pixel MSE
    loss_names = ("pixel", *(f"feature{k + 1}" for k in range(N_FEATURE_LAYERS)), "decoder",
                  "discriminator")
    weight_names = tuple(f"weight{k + 1}" for k in range(N_FEATURE_LAYERS))

    def __init__(self, manifest: dict, config, strategy):
        import keras
        import tensorflow as tf

        from cp2image_tf.training.published.networks import (build_decoder, build_discriminator, conv_kernels,
                                       training_decoder)

        self.manifest, self.config, self.strategy = manifest, config, strategy
        self.settings = settings = config.published
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
                                         noise_dim=config.noise_dim, filters=settings.filters)
            self.decoder_raw = training_decoder(self.decoder)
            self.discriminator = build_discriminator(crop["height"], crop["channels"],
                                                     filters=settings.filters)
            self.decoder_optimizer = keras.optimizers.Adam(
                settings.decoder_lr, beta_1=settings.decoder_beta1, beta_2=settings.decoder_beta2,
                epsilon=settings.decoder_epsilon, name="decoder_adam")
            self.discriminator_optimizer = keras.optimizers.SGD(
                settings.discriminator_lr, momentum=settings.discriminator_momentum,
                name="discriminator_sgd")
            if config.mixed_precision:
                self.decoder_optimizer = keras.optimizers.LossScaleOptimizer(self.decoder_optimizer)
                self.discriminator_optimizer = keras.optimizers.LossScaleOptimizer(
                    self.discriminator_optimizer)
            self.decoder_optimizer.build(self.decoder.trainable_variables)
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)
            self.step = counter("step")
            self.elapsed = counter("elapsed", "float64")
        self.models = (self.decoder, self.discriminator)
        self.kernels = conv_kernels(self.decoder) + conv_kernels(self.discriminator)
        self.checkpoint = tf.train.Checkpoint(
            decoder=self.decoder, discriminator=self.discriminator,
            decoder_optimizer=self.decoder_optimizer,
            discriminator_optimizer=self.discriminator_optimizer, step=self.step,
            elapsed=self.elapsed)
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
            if self.settings.jit_compile and self.strategy.num_replicas_in_sync == 1:
                self._compiled_gradients = tf.function(self.losses_and_gradients, jit_compile=True)
            else:
                self._compiled_gradients = self.losses_and_gradients
        return self._compiled_gradients(features, target, real)

    def losses_and_gradients(self, features, target, real):
        """Forward both networks once; loss terms and both networks' gradients."""
        import tensorflow as tf

        from cp2image_tf.training.published.losses import (discriminator_loss, feature_loss, perceptual_weights,
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
            weights = perceptual_weights(self.step, N_FEATURE_LAYERS, self.settings.perceptual_delay,
                                         self.settings.perceptual_slope)
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
        decay = 1.0 - self.settings.weight_decay

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

    def schedule_weights(self, step: int) -> dict:
        """The perceptual terms' weights in force at a step, for logs."""
        from cp2image_tf.training.published.losses import perceptual_weights

        weights = perceptual_weights(step, N_FEATURE_LAYERS, self.settings.perceptual_delay,
                                     self.settings.perceptual_slope).numpy()
        return {f"weight{k + 1}": float(w) for k, w in enumerate(weights)}

    def before_steps(self, run) -> None:
        """Nothing before its steps (trainer.Trainer)."""

    def judge_rounds(self, run):
        return None
