"""scikit-learn's 8x8 digits: 1,797 real handwritten digits, shipped inside the package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.data.datasets import DATASETS, Dataset, Split, images_to_float
from kdjax.errors import DataError

# sklearn's digits have no official split; this fixed 80/20 split (shuffled with a fixed seed)
# is kdjax's, so every run and every user sees the same test set.
_SPLIT_SEED = 0
_TEST_SIZE = 360


@DATASETS.register("digits")
def load_digits(dataset_config: Mapping[str, Any]) -> Dataset:
    for field in ("raw_dir", "tfds_data_dir"):
        if dataset_config.get(field):
            raise DataError(
                f"dataset.{field}={dataset_config[field]!r} is set, but digits ships with "
                "scikit-learn and reads no files: remove it (or choose dataset.name=mnist or "
                "fashion_mnist)."
            )
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = images_to_float(bunch.images, max_value=16.0)  # pixels are counts 0..16
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    test, train = order[:_TEST_SIZE], order[_TEST_SIZE:]
    return Dataset(
        name="digits",
        train=Split(images[train], labels[train]),
        test=Split(images[test], labels[test]),
        num_classes=10,
    )
