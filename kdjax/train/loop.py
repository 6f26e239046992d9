"""The epoch loop shared by every stage: it feeds batches to a jitted step and times it."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.train.state import TrainState
from kdjax.train.steps import Metrics

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# Called with (epoch, mean metrics of that epoch) after each epoch.
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: list[dict[str, float]]  # one record of mean training metrics per epoch
    wall_time_s: float  # everything, compilation included
    examples_per_s: float  # steady state: the first (compiling) step is left out


def fit(
    state: TrainState,
    train_split: DeviceSplit,
    step_fn: StepFn,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    name: str = "train",
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Runs ``epochs`` epochs of ``step_fn`` over shuffled batches of ``train_split``."""
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
                steady_examples += batch_size
        record = {k: float(v) / steps for k, v in jax.device_get(sums).items()}
        record["epoch"] = epoch + 1
        history.append(record)
        logger.info(
            "%s epoch %d/%d: %s",
            name,
            epoch + 1,
            epochs,
            ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"),
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
