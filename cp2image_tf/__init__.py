"""cp2image_tf: the model and everything done with it, one subpackage per stage.

    training/     config, the networks, losses, tf.distribute strategy, the training loop
    serving/      export to a SavedModel; a local model (LocalModel); the TF Serving client
    drawing/      generate and traverse: cells drawn from profiles; reading profile tables
    evaluation/   evaluate: re-measured features against the input, baselines, report
    explore/      the web page: page logic, routes, server, static files
    measuring/    cp-measure measurements: measure, remeasure (crops), featurize (images)
    metrics.py, viz.py  pure figures and pictures, used by training and evaluation alike
    sampledata.py the embedded synthetic screen

A stage imports only the stages before it (training <- serving <- drawing <- evaluation /
explore; measuring beside them); tests/test_layers.py holds that.
"""
