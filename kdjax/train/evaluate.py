"""Evaluation over a whole split: exact counts, whatever the batch size."""

from __future__ import annotations

import operator

import jax

from kdjax.data.batching import DeviceSplit
from kdjax.train.state import FrozenModel
from kdjax.train.steps import eval_step


def evaluate(model: FrozenModel, split: DeviceSplit, batch_size: int) -> dict[str, float | int]:
    """Accuracy, error count and mean cross-entropy of ``model`` on every example of ``split``."""
    totals = None
    for batch in split.eval_batches(batch_size):
        sums = eval_step(model, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(operator.add, totals, sums)
    totals = jax.device_get(totals)
    count, correct = int(totals["count"]), int(totals["correct"])
    return {
        "accuracy": correct / count,
        "errors": count - correct,
        "count": count,
        "loss": float(totals["loss_sum"]) / count,
    }
