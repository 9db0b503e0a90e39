"""The decoder a FitConfig names: the film model (film.py, the default) or the published one
(model.py), for a dataset's manifest."""
from __future__ import annotations


def build_model_decoder(manifest: dict, config):
    """The decoder of a FitConfig's model for a dataset's manifest (features, crop, channels)."""
    crop = manifest["crop"]
    args = (manifest["features"]["count"], crop["height"], crop["channels"])
    if config.model == "film":
        from cp2image_tf.training.film import build_film_decoder

        return build_film_decoder(*args, noise_dim=config.noise_dim, width=config.filters,
                                  pixel_noise=config.pixel_noise)
    from cp2image_tf.training.model import build_decoder

    return build_decoder(*args, noise_dim=config.noise_dim, filters=config.filters)
