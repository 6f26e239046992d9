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
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kdjax.data.batching import Batch, DeviceSplit, gather_batch
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
# A dispatch: (steps it runs, a function from the state to (new state, metrics)); the metrics
# of a multi-step dispatch are stacked, one row per step.
Dispatch = tuple[int, Callable[[TrainState], tuple[TrainState, Metrics]]]


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


@jax.jit
def _accumulate_steps(sums: Metrics, metrics: Metrics) -> Metrics:
    """:func:`_accumulate` of every row of a multi-step dispatch's stacked metrics."""
    applied = metrics["nonfinite"] == 0
    return {
        k: sums[k] + jnp.sum(v if k == "nonfinite" else jnp.where(applied, v, 0.0), axis=0)
        for k, v in metrics.items()
    }


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _run_steps(
    step: Callable[..., tuple[TrainState, Metrics]],
    static: tuple[tuple[str, Any], ...],
    state: TrainState,
    operands: dict[str, Any],
    images: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    indices: jax.Array,
) -> tuple[TrainState, Metrics]:
    """``len(indices)`` steps of ``step(state, batch, **operands, **static)`` in one compiled
    ``lax.scan``, each gathering its batch from the split on the device: the host dispatches
    once per chunk, not once per step (what a small step's throughput is bound by). Exactly
    the steps a one-step loop runs."""
    mask = jnp.ones(indices.shape[-1], dtype=bool)

    def one_step(state: TrainState, index: jax.Array) -> tuple[TrainState, Metrics]:
        batch = gather_batch(images, labels, teacher_logits, index, mask)
        return step(state, batch, **operands, **dict(static))

    return jax.lax.scan(one_step, state, indices)


def _split_operands(step_fn: StepFn) -> tuple[Callable, tuple, dict[str, Any]]:
    """(step, its static keywords, its array keywords) of a step function.

    A ``functools.partial`` of a step (what :meth:`DataParallel.compile_step` makes) has its
    arrays (the teacher, the temperature) passed to :func:`_run_steps` as arguments; anything
    else is called as it is, and the arrays it closes over are compiled in as constants.
    """
    if not isinstance(step_fn, functools.partial) or step_fn.args:
        return step_fn, (), {}
    arrays, static = {}, []
    for name, value in step_fn.keywords.items():
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves):
            arrays[name] = value
        else:
            static.append((name, value))
    return step_fn.func, tuple(sorted(static, key=lambda item: item[0])), arrays


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
    steps_per_dispatch: int = 1,
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
      steps_per_dispatch: steps run per call into compiled code (a ``lax.scan`` that also
        gathers the batches); one device in one process only. Results are those of one step
        per dispatch; checkpoints, signals and the non-finite check act between dispatches.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ConfigError(
            f"on_nonfinite={on_nonfinite!r} must be one of {', '.join(ON_NONFINITE)}."
        )
    steps_per_epoch = train_split.steps_per_epoch(batch_size)
    total_steps = epochs * steps_per_epoch
    members = 1 if isinstance(seed, int | np.integer) else len(seed)
    parallel = parallel or DataParallel(jax.devices()[:1])
    check_steps_per_dispatch(steps_per_dispatch, parallel)

    def batches(epoch: int, start: int = 0) -> Iterator[Batch]:
        return parallel.train_batches(train_split, batch_size, seed=seed, epoch=epoch, start=start)

    def dispatches(epoch: int, start: int) -> Iterator[Dispatch]:
        if steps_per_dispatch == 1:
            for batch in batches(epoch, start):
                yield 1, functools.partial(_one_step, step_fn, batch)
            return
        chunks = train_split.train_index_chunks(
            batch_size, seed=seed, epoch=epoch, start=start, chunk=steps_per_dispatch
        )
        for indices in chunks:
            yield (
                len(indices),
                functools.partial(_chunk_steps, step_fn, train_split, jnp.asarray(indices)),
            )

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
            for steps, run in dispatches(epoch, offset):
                state, metrics = run(state)
                sums = (_accumulate if steps == 1 else _accumulate_steps)(sums, metrics)
                before, progress.step = progress.step, progress.step + steps
                if on_nonfinite == "stop":
                    pending.append((progress.step, metrics, steps))
                    if sum(n for _, _, n in pending) >= _CHECK_EVERY:
                        check_finite()
                if steady_start is None:
                    jax.block_until_ready(state)
                    steady_start = time.perf_counter()
                else:
                    progress.steady_examples += steps * batch_size * members
                if progress.step % steps_per_epoch == 0:
                    break  # the epoch's last step: saved below, with the epoch's record
                interrupted, due = _stop_or_save(
                    progress.step, checkpoints, epoch_end=False, since=before
                )
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


def _one_step(step_fn: StepFn, batch: Batch, state: TrainState) -> tuple[TrainState, Metrics]:
    return step_fn(state, batch)


def _chunk_steps(
    step_fn: StepFn, split: DeviceSplit, indices: jax.Array, state: TrainState
) -> tuple[TrainState, Metrics]:
    step, static, operands = _split_operands(step_fn)
    return _run_steps(
        step, static, state, operands, split.images, split.labels, split.teacher_logits, indices
    )


def check_steps_per_dispatch(
    steps_per_dispatch: Any, parallel: DataParallel, field: str = "steps_per_dispatch"
) -> None:
    """Refuses a steps-per-dispatch count that is not a whole number >= 1, or > 1 on several
    devices (``field``: its name in the caller's config)."""
    if isinstance(steps_per_dispatch, bool) or not isinstance(steps_per_dispatch, int | np.integer):
        raise ConfigError(f"{field}={steps_per_dispatch!r} must be a whole number >= 1.")
    if steps_per_dispatch < 1:
        raise ConfigError(f"{field}={steps_per_dispatch} must be >= 1 (1: one step per call).")
    if steps_per_dispatch > 1 and not parallel.single:
        raise ConfigError(
            f"{field}={steps_per_dispatch} runs on one device in one process; this run has "
            f"{len(parallel.devices)} devices. Set {field}=1 (a many-device step is already "
            "large) or parallel.devices=1."
        )


def _stop_or_save(
    step: int, checkpoints: TrainCheckpoints | None, *, epoch_end: bool, since: int | None = None
) -> tuple[bool, bool]:
    """(stop for a signal, save a checkpoint) after ``step``.

    The processes of a multi-process job must save and stop at the same step (a save is a
    collective): they compare their signals and clocks every few steps and at each epoch's
    end (one small all-gather), and between those save only by step count. ``since``: the
    step before this dispatch (one dispatch may run several steps; a save falls due if any of
    them was due).
    """
    interrupted = preemption.requested() is not None
    if jax.process_count() == 1:
        return interrupted, checkpoints is not None and checkpoints.due(step, since=since)
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
    pending: list[tuple[int, Metrics, int]],
    sums: Metrics,
    name: str,
    members: int,
    checkpoints: TrainCheckpoints | None,
) -> None:
    """Raises :class:`NonFiniteError` for the first step in ``pending`` that went non-finite;
    empties ``pending`` otherwise. ``sums`` (this epoch's, which include every pending step)
    say with one read whether any did. An entry is (the step after it, its metrics, how many
    steps it ran: their metrics are stacked when more than one)."""
    if not pending:
        return
    if not np.any(to_host(sums["nonfinite"])):
        pending.clear()
        return
    last, metrics, steps = next(p for p in pending if np.any(to_host(p[1]["nonfinite"])))
    values = to_host(metrics)
    step = last
    if steps > 1:  # the first row of the dispatch that went non-finite
        flags = np.asarray(values["nonfinite"]).reshape(steps, -1)
        row = int(np.flatnonzero(np.any(flags, axis=1))[0])
        step = last - steps + 1 + row
        values = {k: v[row] for k, v in values.items()}
    values = {k: np.atleast_1d(v) for k, v in values.items()}
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
