"""Deterministic batches from a split kept on the device.

The whole split is put on the device once; a batch is a gather by an index vector. The order of
epoch ``e`` depends only on ``(seed, e)``, so a run can be resumed at any step and see exactly
the batches it would have seen.

A *population* (several seeds trained side by side, :mod:`kdjax.train.population`) asks for
batches with a list of seeds: every array of the batch then has a leading member axis, and
member ``m`` sees exactly the batches a lone run with ``seeds[m]`` would see.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NotRequired, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data.datasets import Split


class Batch(TypedDict):
    image: jax.Array  # [batch, height, width, channels] float32
    label: jax.Array  # [batch] int32
    mask: jax.Array  # [batch] bool; false rows are padding and count for nothing
    index: jax.Array  # [batch] int32: each example's position in its split (CRD's memory bank)
    teacher_logits: NotRequired[jax.Array]  # [batch, classes], when the split carries them


def gather_batch(
    images: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    index: jax.Array,
    mask: jax.Array,
) -> Batch:
    """The batch of rows ``index`` (``[batch]``, or ``[members, batch]`` for a population);
    traceable, so a multi-step dispatch gathers each step's batch inside its compiled loop."""
    mask = jnp.broadcast_to(mask, index.shape)
    batch = Batch(image=images[index], label=labels[index], mask=mask, index=index)
    if teacher_logits is not None:
        if index.ndim == 2 and teacher_logits.ndim == 3:  # each member its own teacher
            batch["teacher_logits"] = jax.vmap(lambda t, i: t[i])(teacher_logits, index)
        else:
            batch["teacher_logits"] = teacher_logits[index]
    return batch


_gather = jax.jit(gather_batch)


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch, a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class DeviceSplit:
    """A split held on the device, served as fixed-shape batches."""

    def __init__(self, split: Split, teacher_logits: jax.Array | np.ndarray | None = None):
        """``teacher_logits``: ``[examples, classes]``, or ``[members, examples, classes]`` for
        a population whose members each have their own teacher; served as
        ``batch["teacher_logits"]``."""
        self.num_examples = len(split)
        self.host = split  # the host arrays, for batches gathered per process (many devices)
        self.images = jax.device_put(split.images)
        self.labels = jax.device_put(split.labels)
        self.teacher_logits = None if teacher_logits is None else jax.device_put(teacher_logits)
        # Host copy, for batches gathered per process (many devices).
        self.host_teacher_logits = None if teacher_logits is None else np.asarray(teacher_logits)
        if self.teacher_logits is not None and self.teacher_logits.shape[-2] != len(split):
            raise ValueError(
                f"teacher_logits {self.teacher_logits.shape} must have {len(split)} examples"
            )

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_examples // batch_size

    def train_batches(
        self, batch_size: int, *, seed: int | Sequence[int], epoch: int, start: int = 0
    ) -> Iterator[Batch]:
        """Shuffled full batches; the last ``num_examples % batch_size`` examples of each
        epoch's order are left out (a different few each epoch).

        ``seed`` a list: one order per seed, batches ``[members, batch, ...]``. ``start``
        skips the epoch's first batches (a resumed run's position).
        """
        seeds = [seed] if isinstance(seed, int | np.integer) else list(seed)
        order = np.stack([epoch_order(self.num_examples, seed=s, epoch=epoch) for s in seeds])
        if isinstance(seed, int | np.integer):
            order = order[0]
        mask = jnp.ones((batch_size,), dtype=bool)
        for step in range(start, self.steps_per_epoch(batch_size)):
            index = order[..., step * batch_size : (step + 1) * batch_size].astype(np.int32)
            yield _gather(self.images, self.labels, self.teacher_logits, index, mask)

    def train_index_chunks(
        self,
        batch_size: int,
        *,
        seed: int | Sequence[int],
        epoch: int,
        start: int = 0,
        chunk: int = 1,
    ) -> Iterator[np.ndarray]:
        """The row indices of :meth:`train_batches`, ``chunk`` steps at a time:
        ``[steps, batch]`` (``[steps, members, batch]`` for a population) int32 arrays.

        Chunks end at multiples of ``chunk`` steps into the epoch (and at its end), so a run
        resumed mid-epoch falls back in step with an uninterrupted one after one short chunk.
        """
        seeds = [seed] if isinstance(seed, int | np.integer) else list(seed)
        order = np.stack([epoch_order(self.num_examples, seed=s, epoch=epoch) for s in seeds])
        if isinstance(seed, int | np.integer):
            order = order[0]
        steps = self.steps_per_epoch(batch_size)
        step = start
        while step < steps:
            stop = min((step // chunk + 1) * chunk, steps)
            rows = order[..., step * batch_size : stop * batch_size]
            rows = rows.reshape(*rows.shape[:-1], stop - step, batch_size)
            yield np.moveaxis(rows, -2, 0).astype(np.int32)
            step = stop

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every example once, in order; the last batch is padded and its padding masked."""
        for start in range(0, self.num_examples, batch_size):
            index = np.arange(start, start + batch_size)
            valid = index < self.num_examples
            index = np.where(valid, index, 0).astype(np.int32)
            yield _gather(self.images, self.labels, None, index, valid)
