"""Datasets as in-memory arrays, and deterministic batches drawn from them on the device.

- ``digits``: scikit-learn's real 8x8 handwritten digits (embedded; needs neither network nor
  files).
- ``mnist``, ``fashion_mnist``: the official TFDS datasets, downloaded by TFDS or built offline
  from the original IDX ``.gz`` files in ``dataset.raw_dir``.
"""

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.data.datasets import DATASETS, Dataset, Split, load_dataset

__all__ = ["DATASETS", "Batch", "Dataset", "DeviceSplit", "Split", "load_dataset"]
