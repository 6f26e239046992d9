"""Datasets as in-memory arrays, and deterministic batches drawn from them on the device.

- ``digits``: scikit-learn's real 8x8 handwritten digits (embedded; needs neither network nor
  files).
- ``mnist``, ``fashion_mnist``: the official TFDS datasets, downloaded by TFDS or built offline
  from the original IDX ``.gz`` files in ``dataset.raw_dir``.
- ``cifar10``, ``cifar100``: through TFDS, or from the python-pickle release folders in
  ``dataset.raw_dir``; normalised per channel (:mod:`kdjax.data.cifar`).
"""

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.data.datasets import DATASETS, Dataset, Split, load_dataset

__all__ = ["DATASETS", "Batch", "Dataset", "DeviceSplit", "Split", "load_dataset"]
