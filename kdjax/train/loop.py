"""The epoch loop shared by every stage: it feeds batches to a jitted step and times it.

The same loop trains one model (``seed`` an int) or a population (``seed`` a list, one per
member; :mod:`kdjax.train.population`): then batches, metrics and the history carry a member
axis.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.train.state import TrainState
from kdjax.train.steps import Metrics

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# Called with (epoch, mean metrics of that epoch) after each epoch.
EpochCallback = Callable[[int, dict[str, float | list[float]]], None]


@dataclasses.dataclass
class FitResult:
    state: TrainState
    # One record of mean training metrics per epoch (a list per metric for a population).
    history: list[dict[str, float | list[float]]]
    wall_time_s: float  # everything, compilation included
    # Steady state, summed over members: the first (compiling) step is left out.
    examples_per_s: float


def fit(
    state: TrainState,
    train_split: DeviceSplit,
    step_fn: StepFn,
    *,
    epochs: int,
    batch_size: int,
    seed: int | Sequence[int],
    name: str = "train",
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Runs ``epochs`` epochs of ``step_fn`` over shuffled batches of ``train_split``.

    ``seed`` orders the batches; a list of seeds trains a population (``state`` and
    ``step_fn`` with a member axis), each member on its own seed's order.
    """
    members = 1 if isinstance(seed, int | np.integer) else len(seed)
    start = time.perf_counter()
    steady_start, steady_examples = None, 0
    history = []
    for epoch in range(epochs):
        sums, steps = None, 0
        for batch in train_split.train_batches(batch_size, seed=seed, epoch=epoch):
            state, metrics = step_fn(state, batch)
            sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
            steps += 1
            if steady_start is None:
                jax.block_until_ready(state)
                steady_start = time.perf_counter()
            else:
                steady_examples += batch_size * members
        record: dict[str, Any] = {
            k: _mean_over_steps(v, steps) for k, v in jax.device_get(sums).items()
        }
        record["epoch"] = epoch + 1
        history.append(record)
        logger.info(
            "%s epoch %d/%d: %s",
            name,
            epoch + 1,
            epochs,
            ", ".join(_format(k, v) for k, v in record.items() if k != "epoch"),
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    jax.block_until_ready(state)
    end = time.perf_counter()
    steady = end - steady_start if steady_start is not None else 0.0
    return FitResult(
        state=state,
        history=history,
        wall_time_s=end - start,
        examples_per_s=steady_examples / steady if steady > 0 else float("nan"),
    )


def _mean_over_steps(total: Any, steps: int) -> float | list[float]:
    mean = np.asarray(total, dtype=np.float64) / steps
    return float(mean) if mean.ndim == 0 else [float(x) for x in mean]


def _format(name: str, value: float | list[float]) -> str:
    if isinstance(value, list):
        return f"{name}=[{' '.join(f'{x:.4f}' for x in value)}]"
    return f"{name}={value:.4f}"
