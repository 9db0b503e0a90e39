"""serving: a trained decoder as a SavedModel (export), on this machine (local: LocalModel,
load_model) or behind TensorFlow Serving (remote: RemoteModel); both draw the same cells."""
