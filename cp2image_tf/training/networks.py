"""The decoder a FitConfig names: the film model (film.py, the default) or the published one
(model.py), for a dataset's manifest."""
from __future__ import annotations


def build_model_decoder(manifest: dict, config):
    """The decoder of a FitConfig's model for a dataset's manifest (features, crop, channels)."""
    crop = manifest["crop"]
    args = (manifest["features"]["count"], crop["height"], crop["channels"])
    if config.model == "exemplar":
        return build_exemplar(manifest, config)[0]
    if config.model == "film":
        from cp2image_tf.training.film import build_film_decoder

        return build_film_decoder(*args, noise_dim=config.noise_dim, width=config.filters,
                                  pixel_noise=config.pixel_noise)
    from cp2image_tf.training.model import build_decoder

    return build_decoder(*args, noise_dim=config.noise_dim, filters=config.filters)


def build_exemplar(manifest: dict, config):
    """(decoder, editor) of the exemplar model (exemplar.py) for a dataset's manifest."""
    from cp2image_tf.training.exemplar import build_exemplar_networks

    crop = manifest["crop"]
    return build_exemplar_networks(manifest["features"]["count"], crop["height"], crop["channels"],
                                   noise_dim=config.noise_dim, width=config.filters,
                                   bank=config.exemplars, top_k=config.exemplar_top_k,
                                   seed=config.seed, views=config.exemplar_views,
                                   warp=config.exemplar_warp,
                                   training_cells=manifest["counts"]["splits"]["train"])


def check_crop(manifest: dict, config, data_dir=None) -> None:
    """A UserInputError, before any work, when the dataset's crops are too small for the model:
    the film model draws crops from 32 px, the published one from 48 px."""
    from tfrecords_tools.errors import UserInputError

    size = manifest["crop"]["height"]
    if config.model in ("film", "exemplar"):
        from cp2image_tf.training.film import MIN_CROP

        if size >= MIN_CROP:
            return
        advice = f"convert again with --crop-size {MIN_CROP} or more"
        least = MIN_CROP
    else:
        from cp2image_tf.training.model import decoder_sizes

        try:
            decoder_sizes(size)
            return
        except ValueError:
            pass
        least = 48
        advice = ("train the default exemplar model (--model exemplar, from 32 px) or convert "
                  "with --crop-size 48 or more")
    where = f"{data_dir}: its" if data_dir is not None else "The dataset's"
    raise UserInputError(f"{where} crops are {size} px, too small for the {config.model} model "
                         f"(at least {least} px): {advice}.")
