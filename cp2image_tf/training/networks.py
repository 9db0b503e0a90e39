"""The decoder a FitConfig names, for a dataset's manifest: the exemplar model's (the
default; exemplar/), the film decoder (film/) or the published one (published/)."""
from __future__ import annotations


def build_model_decoder(manifest: dict, config):
    """The decoder of a FitConfig's model for a dataset's manifest (features, crop, channels)."""
    crop = manifest["crop"]
    args = (manifest["features"]["count"], crop["height"], crop["channels"])
    settings = config.section
    if config.model == "exemplar":
        from cp2image_tf.training.exemplar.networks import build_exemplar_networks

        return build_exemplar_networks(*args, noise_dim=config.noise_dim, width=settings.filters,
                                       bank=settings.bank, top_k=settings.top_k,
                                       seed=config.seed, views=settings.views,
                                       warp=settings.warp,
                                       training_cells=manifest["counts"]["splits"]["train"])[0]
    if config.model == "film":
        from cp2image_tf.training.film.networks import build_film_decoder

        return build_film_decoder(*args, noise_dim=config.noise_dim, width=settings.filters)
    from cp2image_tf.training.published.networks import build_decoder

    return build_decoder(*args, noise_dim=config.noise_dim, filters=settings.filters)


def check_crop(manifest: dict, config, data_dir=None) -> None:
    """A UserInputError, before any work, when the dataset's crops are too small for the model:
    the exemplar and film models draw crops from 32 px, the published one from 48 px."""
    from cp2image_tf.training.config import MIN_CROP_SIZE
    from tfrecords_tools.errors import UserInputError

    size = manifest["crop"]["height"]
    if config.model in ("film", "exemplar"):
        if size >= MIN_CROP_SIZE:
            return
        advice = f"convert again with --crop-size {MIN_CROP_SIZE} or more"
        least = MIN_CROP_SIZE
    else:
        from cp2image_tf.training.published.networks import decoder_sizes

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
