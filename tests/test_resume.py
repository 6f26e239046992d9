"""Runs that survive: exact resume, signals, verified checkpoints, the NaN guard (in process)."""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import DeviceSplit
from kdjax.errors import CheckpointError, Interrupted, NonFiniteError
from kdjax.models import build_model
from kdjax.train import distill_step, fit, make_optimizer, preemption, train_step
from kdjax.train.population import (
    init_member,
    init_population,
    member_keys,
    population_distill_from_logits_step,
    population_train_step,
    predict_logits,
)
from kdjax.train.resume import MANIFEST, TrainCheckpoints
from kdjax.train.steps import distill_from_logits_step

EPOCHS, BATCH = 3, 64  # digits: 22 steps an epoch, 66 in all


def _model(hidden=(48,), dropout=0.3):
    config = {"name": "mlp", "hidden_sizes": hidden, "dropout_rate": dropout}
    return build_model(config, num_classes=10, field="student.model")


def _tx(steps=EPOCHS * 22):
    config = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "schedule": "cosine"}
    return make_optimizer(config, total_steps=steps, field="student.optimizer")


def _fresh(digits, model=None):
    return init_member(model or _model(), _tx(), jax.random.key(4), digits.train.images[:1])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_bit_identical(a, b):
    left, right = _leaves(a), _leaves(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _tracing(state):
    """Whether ``fit`` is only tracing a step for its shapes (it does once, before training)."""
    return isinstance(state.step, jax.core.Tracer)


def _interrupt_at(step_fn, at_step):
    """``step_fn`` that raises the preemption flag during its ``at_step``-th call (1-based), as
    a SIGTERM arriving while that step runs would."""
    calls = []

    def wrapped(state, batch):
        if not _tracing(state):
            calls.append(1)
        if len(calls) == at_step:
            preemption._requested.append(signal.SIGTERM)
        return step_fn(state, batch)

    return wrapped


@pytest.fixture(autouse=True)
def _no_stale_signal():
    preemption._requested.clear()
    yield
    preemption._requested.clear()


def _fit(state, split, step_fn, seed, checkpoints=None, **kwargs):
    return fit(
        state,
        split,
        step_fn,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=seed,
        checkpoints=checkpoints,
        **kwargs,
    )


def _interrupted_then_resumed(make_state, split, step_fn, seed, directory, stops, every=5):
    """Fits, interrupting at each step in ``stops`` and resuming from the checkpoints."""
    for stop in stops:
        checkpoints = TrainCheckpoints(directory, every_steps=every)
        with pytest.raises(Interrupted, match=r"checkpoint saved at step \d+.*same command"):
            _fit(make_state(), split, _interrupt_at(step_fn, stop), seed, checkpoints)
        preemption._requested.clear()
    return _fit(make_state(), split, step_fn, seed, TrainCheckpoints(directory, every_steps=every))


@pytest.mark.parametrize("stops", [[1], [7, 30], [22, 22, 22]])
def test_interrupted_fit_resumes_bit_identical(digits, tmp_path, stops):
    """Dropout and jitter on; stops mid-epoch, at an epoch's end, and several times."""
    split = DeviceSplit(digits.train)
    step = functools.partial(train_step, max_shift=1)
    uninterrupted = _fit(_fresh(digits), split, step, 0)
    resumed = _interrupted_then_resumed(
        lambda: _fresh(digits), split, step, 0, str(tmp_path / "ckpt"), stops
    )
    _assert_bit_identical(uninterrupted.state.params, resumed.state.params)
    _assert_bit_identical(uninterrupted.state.opt_state, resumed.state.opt_state)
    assert int(resumed.state.step) == EPOCHS * 22
    # The epoch means are the same numbers too: the unfinished epoch's sums were saved.
    assert resumed.history == uninterrupted.history


def test_interrupted_distillation_resumes_bit_identical(digits, tmp_path):
    split = DeviceSplit(digits.train)
    teacher = _fresh(digits, _model((64,), 0.0)).frozen()
    step = functools.partial(
        distill_step,
        teacher=teacher,
        temperature=jnp.float32(4.0),
        alpha=jnp.float32(0.9),
        max_shift=1,
    )
    uninterrupted = _fit(_fresh(digits), split, step, 3)
    resumed = _interrupted_then_resumed(
        lambda: _fresh(digits), split, step, 3, str(tmp_path / "ckpt"), [13, 50]
    )
    _assert_bit_identical(uninterrupted.state.params, resumed.state.params)
    _assert_bit_identical(teacher.variables, _fresh(digits, _model((64,), 0.0)).frozen().variables)


def test_interrupted_population_resumes_bit_identical(digits, tmp_path):
    split = DeviceSplit(digits.train)
    seeds = [2, 0, 5]

    def population():
        return init_population(_model(), _tx(), member_keys(seeds), digits.train.images[:1])

    step = functools.partial(population_train_step, max_shift=1)
    uninterrupted = _fit(population(), split, step, seeds)
    resumed = _interrupted_then_resumed(
        population, split, step, seeds, str(tmp_path / "ckpt"), [9, 40], every=4
    )
    _assert_bit_identical(uninterrupted.state.params, resumed.state.params)
    assert resumed.history == uninterrupted.history


def test_a_finished_fit_is_restored_not_retrained(digits, tmp_path):
    split = DeviceSplit(digits.train)
    directory = str(tmp_path / "ckpt")
    first = _fit(_fresh(digits), split, train_step, 0, TrainCheckpoints(directory))
    calls = []

    def counting(state, batch):
        if not _tracing(state):
            calls.append(1)
        return train_step(state, batch)

    again = _fit(_fresh(digits), split, counting, 0, TrainCheckpoints(directory))
    assert calls == []  # not one step
    _assert_bit_identical(first.state.params, again.state.params)
    assert again.history == first.history and again.wall_time_s > 0


def test_checkpoints_are_bounded_and_verified(digits, tmp_path):
    split = DeviceSplit(digits.train)
    checkpoints = TrainCheckpoints(str(tmp_path / "ckpt"), every_steps=4, max_to_keep=3)
    _fit(_fresh(digits), split, train_step, 0, checkpoints)
    assert checkpoints.verified_steps() == [60, 64, 66]  # every 4 steps, and the last one
    with open(tmp_path / "ckpt" / "66" / MANIFEST) as f:
        manifest = json.load(f)
    assert manifest["step"] == 66 and len(manifest["files"]) >= 5


def test_a_save_cut_off_is_ignored_and_the_previous_one_used(digits, tmp_path):
    """What a kill during a save leaves: an orbax temporary folder (killed while orbax wrote)
    or a finished orbax folder without kdjax's manifest (killed before it was written)."""
    split = DeviceSplit(digits.train)
    directory = tmp_path / "ckpt"
    step = functools.partial(train_step, max_shift=1)
    uninterrupted = _fit(_fresh(digits), split, step, 0)
    checkpoints = TrainCheckpoints(str(directory), every_steps=10, max_to_keep=5)
    with pytest.raises(Interrupted):
        _fit(_fresh(digits), split, _interrupt_at(step, 35), 0, checkpoints)
    preemption._requested.clear()
    assert checkpoints.verified_steps() == [10, 20, 30, 35]
    os.remove(directory / "35" / MANIFEST)  # killed after orbax, before the manifest
    partial = directory / "40.orbax-checkpoint-tmp-1796370000"  # killed inside orbax
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    resumed = _fit(_fresh(digits), split, step, 0, TrainCheckpoints(str(directory), every_steps=10))
    _assert_bit_identical(uninterrupted.state.params, resumed.state.params)
    assert not partial.exists()


def test_a_corrupted_checkpoint_is_an_error_naming_the_file(digits, tmp_path):
    split = DeviceSplit(digits.train)
    directory = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        _fit(
            _fresh(digits),
            split,
            _interrupt_at(train_step, 30),
            0,
            TrainCheckpoints(str(directory), every_steps=10),
        )
    preemption._requested.clear()
    files = [p for p in (directory / "30").rglob("*") if p.is_file() and p.name != MANIFEST]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=rf"{biggest}.*corrupted.*delete .*30 to resume"):
        _fit(_fresh(digits), split, train_step, 0, TrainCheckpoints(str(directory)))
    biggest.unlink()
    with pytest.raises(CheckpointError, match=rf"{biggest} is missing"):
        _fit(_fresh(digits), split, train_step, 0, TrainCheckpoints(str(directory)))
    assert (directory / "30").is_dir() and (directory / "20").is_dir()  # nothing deleted


def _nan_teacher_logits_at(step_fn, at_step):
    calls = []

    def wrapped(state, batch):
        if not _tracing(state):
            calls.append(1)
        if len(calls) == at_step:
            batch = dict(batch, teacher_logits=batch["teacher_logits"].at[..., 0, 3].set(jnp.nan))
        return step_fn(state, batch)

    return wrapped


def _logits_split(digits):
    teacher = _fresh(digits, _model((64,), 0.0)).frozen()
    plain = DeviceSplit(digits.train)
    return DeviceSplit(digits.train, predict_logits(teacher, plain, 500, members=False))


def test_nan_in_a_batch_stops_naming_the_term_and_keeps_the_last_checkpoint(digits, tmp_path):
    split = _logits_split(digits)
    step = functools.partial(
        distill_from_logits_step, temperature=jnp.float32(4.0), alpha=jnp.float32(0.5)
    )
    directory = tmp_path / "ckpt"
    checkpoints = TrainCheckpoints(str(directory), every_steps=10)
    with pytest.raises(NonFiniteError) as raised:
        _fit(_fresh(digits), split, _nan_teacher_logits_at(step, 27), 0, checkpoints, name="kd")
    message = str(raised.value)
    # The teacher's logits went bad, so the soft term (and the total) did; the hard one did not.
    assert message.startswith("kd: non-finite soft_kl, loss at step 27")
    assert "hard_ce=" in message and "hard_ce=nan" not in message
    assert f"last good checkpoint, step 20, is kept in {directory}" in message
    assert checkpoints.verified_steps() == [10, 20]
    # The kept checkpoint resumes to the same model as an uninterrupted run.
    resumed = _fit(_fresh(digits), split, step, 0, TrainCheckpoints(str(directory), every_steps=10))
    _assert_bit_identical(_fit(_fresh(digits), split, step, 0).state.params, resumed.state.params)


def test_nan_steps_are_skipped_and_counted_when_asked(digits):
    split = _logits_split(digits)
    step = functools.partial(
        distill_from_logits_step, temperature=jnp.float32(4.0), alpha=jnp.float32(0.5)
    )
    result = _fit(_fresh(digits), split, _nan_teacher_logits_at(step, 27), 0, on_nonfinite="skip")
    assert [r["nonfinite_steps"] for r in result.history] == [0, 1, 0]
    assert all(np.isfinite(leaf).all() for leaf in _leaves(result.state.params))
    assert all(np.isfinite(v) for r in result.history for k, v in r.items() if k != "epoch")
    # The skipped step changed nothing but the step counter.
    assert int(result.state.step) == EPOCHS * 22


def test_a_population_member_going_nan_is_named(digits):
    split = _logits_split(digits)
    logits = np.stack([split.teacher_logits] * 2)
    population_split = DeviceSplit(digits.train, logits)
    temperatures, alphas = jnp.asarray([2.0, 4.0]), jnp.asarray([0.9, 0.9])

    calls = []

    def step(states, batch):
        if not _tracing(states):
            calls.append(1)
        if len(calls) == 5:
            batch = dict(batch, teacher_logits=batch["teacher_logits"].at[1, 0, 0].set(jnp.inf))
        return population_distill_from_logits_step(states, batch, temperatures, alphas)

    states = init_population(_model(), _tx(), member_keys([0, 1]), digits.train.images[:1])
    with pytest.raises(NonFiniteError, match=r"step 5 \(population member 1 of 2\)"):
        _fit(states, population_split, step, [0, 1])
