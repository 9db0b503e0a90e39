"""The nearest-neighbour lookup: the training cell whose normalised profile is closest, the
baseline evaluate compares the model with and the lookup controllability draws beside it."""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from tfrecords_tools.reader import feature_normalizer


def nearest_neighbours(query_raw, reference_raw, manifest: dict, normalization: str) -> np.ndarray:
    """Index of the reference cell whose normalised features are nearest each query cell."""
    median, center, scale = feature_normalizer(manifest, normalization)

    def normalise(raw):
        return (np.where(np.isfinite(raw), raw, median) - center) / scale

    index = NearestNeighbors(n_neighbors=1).fit(normalise(reference_raw))
    return index.kneighbors(normalise(query_raw), return_distance=False)[:, 0]
