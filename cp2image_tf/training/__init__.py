"""training: the FitConfig, the networks (film: the default; model: the published CP2Image
ones), their trainers (film_trainer, published, losses), the tf.distribute strategy and the
training loop (train.fit)."""
