"""Evaluation over a whole split: exact counts, whatever the batch size and device count."""

from __future__ import annotations

import operator

import jax

from kdjax.data.batching import DeviceSplit
from kdjax.train.parallel import DataParallel, to_host
from kdjax.train.state import FrozenModel


def evaluate(
    model: FrozenModel,
    split: DeviceSplit,
    batch_size: int,
    parallel: DataParallel | None = None,
) -> dict[str, float | int]:
    """Accuracy, error count and mean cross-entropy of ``model`` on every example of ``split``,
    on ``parallel``'s devices (None: one); padded rows count for nothing."""
    parallel = parallel or DataParallel(jax.devices()[:1])
    model = parallel.place(model)
    step = parallel.eval_step
    totals = None
    for batch in parallel.eval_batches(split, batch_size):
        sums = step(model, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(operator.add, totals, sums)
    totals = to_host(totals)
    count, correct = int(totals["count"]), int(totals["correct"])
    return {
        "accuracy": correct / count,
        "errors": count - correct,
        "count": count,
        "loss": float(totals["loss_sum"]) / count,
    }
