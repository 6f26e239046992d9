"""Deterministic batches from a split kept on the device.

The whole split is put on the device once; a batch is a gather by an index vector. The order of
epoch ``e`` depends only on ``(seed, e)``, so a run can be resumed at any step and see exactly
the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data.datasets import Split


class Batch(TypedDict):
    image: jax.Array  # [batch, height, width, channels] float32
    label: jax.Array  # [batch] int32
    mask: jax.Array  # [batch] bool; false rows are padding and count for nothing


@jax.jit
def _gather(images: jax.Array, labels: jax.Array, index: jax.Array, mask: jax.Array) -> Batch:
    return Batch(image=images[index], label=labels[index], mask=mask)


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch, a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class DeviceSplit:
    """A split held on the device, served as fixed-shape batches."""

    def __init__(self, split: Split):
        self.num_examples = len(split)
        self.images = jax.device_put(split.images)
        self.labels = jax.device_put(split.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_examples // batch_size

    def train_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[Batch]:
        """Shuffled full batches; the last ``num_examples % batch_size`` examples of each
        epoch's order are left out (a different few each epoch)."""
        order = epoch_order(self.num_examples, seed=seed, epoch=epoch)
        mask = jnp.ones((batch_size,), dtype=bool)
        for step in range(self.steps_per_epoch(batch_size)):
            index = order[step * batch_size : (step + 1) * batch_size].astype(np.int32)
            yield _gather(self.images, self.labels, index, mask)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every example once, in order; the last batch is padded and its padding masked."""
        for start in range(0, self.num_examples, batch_size):
            index = np.arange(start, start + batch_size)
            valid = index < self.num_examples
            index = np.where(valid, index, 0).astype(np.int32)
            yield _gather(self.images, self.labels, index, valid)
