"""training: the FitConfig (config), the loop (train.fit) over the trainer interface (trainer),
the run folder (run_folder), validation, the tf.distribute strategy, and one subpackage per
model: exemplar (the default), film (a baseline) and published, with what the exemplar and
film models share in shared."""
