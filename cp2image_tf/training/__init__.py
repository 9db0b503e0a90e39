"""training: the FitConfig, the CP2Image networks and losses, the tf.distribute strategy and
the training loop (fit)."""
