"""The teacher's logits of every training example, computed once and reused.

On unaugmented data a teacher's output for an example never changes, so a distilled student
need not run the teacher at every step of every epoch: :func:`cached_teacher_logits` computes
the logits of the whole training split once, in order, so that **row i is example i's**, keyed
by the example's index in its split and never by a batch position, since every epoch
batches in a different order. The student's step then reads ``batch["teacher_logits"]`` gathered
by the same index as its images (:func:`kdjax.train.steps.distill_from_logits_step`).

The cache is a file, ``teacher_logits.npz``, with a fingerprint of what it depends on (the
teacher's variables, the split's images and labels, the precision): a rerun, another student
or seed or temperature taught by the same teacher (``teacher.checkpoint``) reads it instead of
recomputing it, and a file whose fingerprint does not match is recomputed, never used.
Augmented training cannot use it (each step's view is new); the config check refuses that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kdjax import distributed
from kdjax.data.batching import DeviceSplit
from kdjax.train.parallel import DataParallel
from kdjax.train.state import FrozenModel

logger = logging.getLogger(__name__)

CACHE_FILE = "teacher_logits.npz"


def fingerprint(teacher: FrozenModel, split: DeviceSplit) -> str:
    """SHA-256 of everything the logits depend on."""
    digest = hashlib.sha256()
    digest.update(teacher.precision.encode())
    for leaf in jax.tree_util.tree_leaves(teacher.variables):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    digest.update(np.ascontiguousarray(split.host.images).tobytes())
    digest.update(np.ascontiguousarray(split.host.labels).tobytes())
    return digest.hexdigest()


@jax.jit
def _logits(teacher: FrozenModel, images: jax.Array) -> jax.Array:
    return teacher(images)[0].astype(jnp.float32)


def compute_logits(
    teacher: FrozenModel, split: DeviceSplit, batch_size: int, parallel: DataParallel
) -> np.ndarray:
    """``[examples, classes]`` float32 logits of every example of ``split``, row i example i."""
    teacher = parallel.place(teacher)
    rows = []
    for batch in parallel.eval_batches(split, batch_size):
        logits, mask = _logits(teacher, batch["image"]), batch["mask"]
        if not logits.is_fully_addressable:  # rows held by other processes
            logits, mask = multihost_utils.process_allgather((logits, mask), tiled=True)
        rows.append(np.asarray(logits)[np.asarray(mask)])
    return np.concatenate(rows)


def cached_teacher_logits(
    teacher: FrozenModel,
    split: DeviceSplit,
    *,
    read_from: list[str],
    write_to: str,
    batch_size: int,
    parallel: DataParallel,
) -> np.ndarray:
    """The teacher's logits of ``split``: read from the first folder of ``read_from`` whose
    cache matches, or computed and saved in ``write_to`` (atomically, by the primary process)."""
    key = fingerprint(teacher, split)
    for folder in read_from:
        path = os.path.join(folder, CACHE_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with np.load(path) as saved:
                if str(saved["fingerprint"]) == key:
                    logger.info("Teacher logits read from %s.", path)
                    return saved["logits"]
        # Truncated, empty, not an npz, or without our keys: the file is not used.
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as err:
            logger.warning("Ignoring unreadable teacher-logit cache %s (%r).", path, err)
            continue
        logger.info("Teacher-logit cache %s is for another teacher or data.", path)
    logits = compute_logits(teacher, split, batch_size, parallel)
    if distributed.is_primary():
        os.makedirs(write_to, exist_ok=True)
        path = os.path.join(write_to, CACHE_FILE)
        partial = path + ".partial.npz"
        np.savez(partial, logits=logits, fingerprint=np.array(key))
        os.replace(partial, path)
        logger.info("Teacher logits of %d examples saved to %s.", len(logits), path)
    distributed.barrier("kdjax-teacher-cache")
    return logits
