"""The film decoder's trainer: the shared measurer-and-critic training (shared/critic_trainer.py)
with a pixel loss to the paired crop (FilmSettings.pixel_weight)."""
from __future__ import annotations

import tensorflow as tf

from cp2image_tf.training.shared.critic_trainer import CriticTrainer


class FilmTrainer(CriticTrainer):
    """The film decoder, its measurer and critic."""

    @property
    def pixel_weight(self) -> float:
        return self.settings.pixel_weight

    def build_decoder(self):
        from cp2image_tf.training.film.networks import build_film_decoder

        crop = self.manifest["crop"]
        return build_film_decoder(self.n_features, crop["height"], crop["channels"],
                                  noise_dim=self.config.noise_dim, width=self.settings.filters)

    def draw_for_training(self, features, target):
        return self.decoder(self.decoder_inputs(features), training=True), tf.shape(target)[0]

    def model_terms(self, measured, drawn, batch: float):
        """No terms of its own (the anchor, identity and geometry columns stay 0); every row a
        fake."""
        zero = tf.zeros(())
        return (measured, {"anchor": (zero, 0.0), "identity": (zero, 0.0), "geometry": (zero, 0.0)},
                tf.ones([drawn]))
