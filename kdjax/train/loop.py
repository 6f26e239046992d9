"""The epoch loop shared by every stage: it feeds batches to a jitted step, times it, and makes
the run survive (checkpoints, resume, signals, non-finite losses).

The same loop trains one model (``seed`` an int) or a population (``seed`` a list, one per
member; :mod:`kdjax.train.population`): then batches, metrics and the history carry a member
axis.

With ``checkpoints`` (:class:`~kdjax.train.resume.TrainCheckpoints`) a fit starts from the
newest checkpoint it finds there and ends bit-identical to a fit that was never interrupted:
the state, the batch order (a function of seed and epoch) and the step keys (a function of the
step) are all restored or derived. A SIGTERM/SIGINT under
:func:`kdjax.train.preemption.stop_on_signals` saves at the next step boundary and raises
:class:`~kdjax.errors.Interrupted`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.errors import ConfigError, Interrupted, NonFiniteError
from kdjax.train import preemption
from kdjax.train.parallel import DataParallel, to_host
from kdjax.train.resume import Progress, TrainCheckpoints
from kdjax.train.state import TrainState
from kdjax.train.steps import Metrics

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# Called with (epoch, mean metrics of that epoch) after each epoch.
EpochCallback = Callable[[int, dict[str, Any]], None]
# Called once before training, with the records of the epochs a resumed fit had finished
# (none on a fresh start): what a metrics file should hold at that point.
StartCallback = Callable[[list[dict[str, Any]]], None]

ON_NONFINITE = ("stop", "skip")
# Metrics that are not loss terms: never named as the term that went non-finite.
_NOT_TERMS = ("accuracy", "teacher_agreement", "nonfinite")
_CHECK_EVERY = 16  # steps between reads of the non-finite count (stop mode)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    # One record of mean training metrics per epoch (a list per metric for a population).
    history: list[dict[str, Any]]
    wall_time_s: float  # everything, compilation included, summed over resumed processes
    # Steady state, summed over members: each process's first (compiling) step is left out.
    examples_per_s: float


@jax.jit
def _accumulate(sums: Metrics, metrics: Metrics) -> Metrics:
    """Adds a step's metrics to the epoch's sums; a skipped (non-finite) step adds only its
    ``nonfinite`` count, so the epoch means are over the steps that were applied."""
    applied = metrics["nonfinite"] == 0
    return {
        k: sums[k] + (v if k == "nonfinite" else jnp.where(applied, v, 0.0))
        for k, v in metrics.items()
    }


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
    checkpoints: TrainCheckpoints | None = None,
    on_start: StartCallback | None = None,
    on_nonfinite: str = "stop",
    parallel: DataParallel | None = None,
) -> FitResult:
    """Runs ``epochs`` epochs of ``step_fn`` over shuffled batches of ``train_split``.

    Args:
      seed: orders the batches; a list of seeds trains a population (``state`` and
        ``step_fn`` with a member axis), each member on its own seed's order.
      checkpoints: where to save and resume from (None: neither).
      on_nonfinite: ``"stop"`` raises :class:`NonFiniteError` at the first step whose loss or
        gradient is not finite (naming the term; the last checkpoint is kept); ``"skip"``
        leaves such steps out and counts them (``nonfinite_steps`` in the history).
      parallel: the devices to train on (None: one). ``step_fn`` must then be compiled for
        them (:meth:`DataParallel.compile_step`); ``state`` is placed here, and the returned
        state is laid out as checkpoints store it.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ConfigError(
            f"on_nonfinite={on_nonfinite!r} must be one of {', '.join(ON_NONFINITE)}."
        )
    steps_per_epoch = train_split.steps_per_epoch(batch_size)
    total_steps = epochs * steps_per_epoch
    members = 1 if isinstance(seed, int | np.integer) else len(seed)
    parallel = parallel or DataParallel(jax.devices()[:1])

    def batches(epoch: int, start: int = 0) -> Iterator[Batch]:
        return parallel.train_batches(train_split, batch_size, seed=seed, epoch=epoch, start=start)

    state = parallel.place(state)
    metric_shapes = jax.eval_shape(step_fn, state, next(batches(0)))[1]

    def zero_sums() -> Metrics:
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), metric_shapes)
        return parallel.replicate(jax.tree_util.tree_map(jnp.asarray, zeros))

    sums, progress = zero_sums(), Progress()
    if checkpoints is not None:
        restored = checkpoints.restore_latest(parallel.saved(state), sums)
        if restored is not None:
            state, sums, progress = restored
            state = parallel.place(state)
        else:
            logger.info("%s: no checkpoint in %s, starting at step 0.", name, checkpoints.directory)
    if on_start is not None:
        on_start(progress.history)

    def save() -> None:
        if checkpoints is not None:
            progress.wall_time_s = wall_before + time.perf_counter() - start
            progress.steady_time_s = steady_before + (
                time.perf_counter() - steady_start if steady_start is not None else 0.0
            )
            checkpoints.save(parallel.saved(state), sums, progress)

    start = time.perf_counter()
    wall_before, steady_before = progress.wall_time_s, progress.steady_time_s
    steady_start = None
    # Steps whose finiteness is not yet checked: checking every step would make the host wait
    # for the device each step; a running count in the epoch sums is read every few steps.
    pending: list[tuple[int, Metrics]] = []

    def check_finite() -> None:
        if on_nonfinite == "stop":
            _check_finite(pending, sums, name, members, checkpoints)

    with preemption.training():
        while progress.step < total_steps:
            epoch, offset = divmod(progress.step, steps_per_epoch)
            if offset == 0:
                sums = zero_sums()
            for batch in batches(epoch, offset):
                state, metrics = step_fn(state, batch)
                sums = _accumulate(sums, metrics)
                progress.step += 1
                if on_nonfinite == "stop":
                    pending.append((progress.step, metrics))
                    if len(pending) >= _CHECK_EVERY:
                        check_finite()
                if steady_start is None:
                    jax.block_until_ready(state)
                    steady_start = time.perf_counter()
                else:
                    progress.steady_examples += batch_size * members
                if progress.step % steps_per_epoch == 0:
                    break  # the epoch's last step: saved below, with the epoch's record
                interrupted, due = _stop_or_save(progress.step, checkpoints, epoch_end=False)
                if interrupted or due:
                    check_finite()
                    save()
                if interrupted:
                    raise Interrupted(_interrupted_message(name, progress.step, checkpoints))
            check_finite()
            record = _epoch_record(to_host(sums), steps_per_epoch, on_nonfinite)
            record["epoch"] = epoch + 1
            progress.history.append(record)
            if np.any(record.get("nonfinite_steps", 0)):
                logger.warning(
                    "%s epoch %d: skipped %s of %d steps whose loss or gradient was not finite.",
                    name,
                    epoch + 1,
                    record["nonfinite_steps"],
                    steps_per_epoch,
                )
            interrupted, due = _stop_or_save(progress.step, checkpoints, epoch_end=True)
            last = progress.step == total_steps
            if checkpoints is not None and (interrupted or last or due):
                save()
            _log_epoch(name, epoch + 1, epochs, record)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if interrupted:
                raise Interrupted(_interrupted_message(name, progress.step, checkpoints))
    jax.block_until_ready(state)
    end = time.perf_counter()
    steady = steady_before + (end - steady_start if steady_start is not None else 0.0)
    return FitResult(
        state=parallel.saved(state),
        history=progress.history,
        wall_time_s=wall_before + end - start,
        examples_per_s=progress.steady_examples / steady if steady > 0 else float("nan"),
    )


def _stop_or_save(
    step: int, checkpoints: TrainCheckpoints | None, *, epoch_end: bool
) -> tuple[bool, bool]:
    """(stop for a signal, save a checkpoint) after ``step``.

    The processes of a multi-process job must save and stop at the same step (a save is a
    collective): they compare their signals and clocks every few steps and at each epoch's
    end (one small all-gather), and between those save only by step count.
    """
    interrupted = preemption.requested() is not None
    if jax.process_count() == 1:
        return interrupted, checkpoints is not None and checkpoints.due(step)
    if not epoch_end and step % _CHECK_EVERY:
        return False, checkpoints is not None and checkpoints.due(step, by_time=False)
    due = checkpoints is not None and checkpoints.due(step)
    anywhere = multihost_utils.process_allgather(np.array([interrupted, due], np.int32))
    return bool(np.any(anywhere[..., 0])), bool(np.any(anywhere[..., 1]))


def _epoch_record(sums: dict[str, Any], steps: int, on_nonfinite: str) -> dict[str, Any]:
    """Mean metrics of an epoch over its applied steps; with ``skip``, their count too."""
    skipped = np.asarray(sums["nonfinite"], dtype=np.float64)
    applied = steps - skipped
    with np.errstate(invalid="ignore", divide="ignore"):
        # An epoch whose every step was skipped has no mean: NaN, not a plausible-looking 0.
        record = {
            k: _as_python(np.where(applied > 0, np.asarray(v, np.float64) / applied, np.nan))
            for k, v in sums.items()
            if k != "nonfinite"
        }
    if on_nonfinite == "skip":
        record["nonfinite_steps"] = _as_python(skipped.astype(np.int64))
    return record


def _as_python(value: np.ndarray) -> Any:
    return value.item() if value.ndim == 0 else value.tolist()


def _check_finite(
    pending: list[tuple[int, Metrics]],
    sums: Metrics,
    name: str,
    members: int,
    checkpoints: TrainCheckpoints | None,
) -> None:
    """Raises :class:`NonFiniteError` for the first step in ``pending`` that went non-finite;
    empties ``pending`` otherwise. ``sums`` (this epoch's, which include every pending step)
    say with one read whether any did."""
    if not pending:
        return
    if not np.any(to_host(sums["nonfinite"])):
        pending.clear()
        return
    step, metrics = next((s, m) for s, m in pending if np.any(to_host(m["nonfinite"])))
    values = {k: np.atleast_1d(v) for k, v in to_host(metrics).items()}
    member = int(np.flatnonzero(values["nonfinite"])[0])
    bad = [
        k
        for k, v in values.items()
        if k not in _NOT_TERMS and k != "grad_norm" and not np.isfinite(v[member])
    ]
    bad.sort(key=lambda k: k == "loss")  # the terms that broke first, then their total
    what = ", ".join(bad) if bad else "the gradient (every loss term was finite)"
    shown = ", ".join(
        f"{k}={values[k][member]:.4g}" for k in values if k not in ("nonfinite", "accuracy")
    )
    who = f" (population member {member} of {members})" if members > 1 else ""
    raise NonFiniteError(
        f"{name}: non-finite {what} at step {step}{who}: {shown}. The step was not applied. "
        f"{_last_checkpoint(checkpoints)} Lower the learning rate (or add warm-up) and rerun "
        "with --overwrite (or in another --workdir), or set on_nonfinite=skip to resume "
        "leaving such steps out and counting them."
    )


def _last_checkpoint(checkpoints: TrainCheckpoints | None) -> str:
    if checkpoints is None:
        return "No checkpoints were being written."
    steps = checkpoints.verified_steps()
    if not steps:
        return "No checkpoint had been written yet."
    return f"The last good checkpoint, step {steps[-1]}, is kept in {checkpoints.directory}."


def _interrupted_message(name: str, step: int, checkpoints: TrainCheckpoints | None) -> str:
    where = (
        f"checkpoint saved at step {step} in {checkpoints.directory}"
        if checkpoints is not None
        else "no checkpoints were being written, so nothing was saved"
    )
    return f"{name}: interrupted by a signal; {where}. Run the same command again to resume."


def _log_epoch(name: str, epoch: int, epochs: int, record: dict[str, Any]) -> None:
    logger.info(
        "%s epoch %d/%d: %s",
        name,
        epoch,
        epochs,
        ", ".join(_format(k, v) for k, v in record.items() if k != "epoch"),
    )


def _format(name: str, value: float | list[float]) -> str:
    if isinstance(value, list):
        return f"{name}=[{' '.join(f'{x:.4g}' for x in value)}]"
    return f"{name}={value:.4g}"
