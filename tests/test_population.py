"""Populations: each vmapped member trains exactly as that seed would alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import DeviceSplit
from kdjax.models import build_model
from kdjax.train import distill_step, fit, make_optimizer, train_step
from kdjax.train.population import (
    init_member,
    init_population,
    member,
    member_keys,
    population_distill_from_logits_step,
    population_distill_step,
    population_train_step,
    predict_logits,
    select_members,
    stack_members,
)
from kdjax.train.steps import distill_from_logits_step

SEEDS = [3, 0, 7]
OPTIMIZER = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "max_norm": 2.0}


def _model(hidden=(48, 24), dropout=0.3):
    config = {"name": "mlp", "hidden_sizes": hidden, "dropout_rate": dropout}
    return build_model(config, num_classes=10, field="student.model")


def _tx(steps):
    return make_optimizer(OPTIMIZER, total_steps=steps, field="student.optimizer")


def _fit(state, split, step_fn, seed):
    return fit(state, split, step_fn, epochs=2, batch_size=64, seed=seed).state


def _assert_members_match(population, lone_states):
    for m, lone in enumerate(lone_states):
        got = jax.tree_util.tree_leaves(member(population.params, m))
        want = jax.tree_util.tree_leaves(lone.params)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)
        assert int(population.step[m]) == int(lone.step)


def test_vmapped_seeds_train_like_each_seed_alone(digits):
    """Dropout, jitter and max-norm all on: the strictest case for key and batch handling."""
    split = DeviceSplit(digits.train)
    model, tx = _model(), _tx(2 * split.steps_per_epoch(64))
    images = digits.train.images[:1]
    population = init_population(model, tx, member_keys(SEEDS), images)
    step = functools.partial(population_train_step, max_shift=1)
    population = _fit(population, split, step, SEEDS)
    lone = [
        _fit(
            init_member(model, tx, jax.random.key(s), images),
            split,
            functools.partial(train_step, max_shift=1),
            s,
        )
        for s in SEEDS
    ]
    _assert_members_match(population, lone)
    # Different seeds really are different runs.
    a, b = (jax.tree_util.tree_leaves(member(population.params, m))[0] for m in (0, 1))
    assert not np.allclose(a, b)


def test_vmapped_distillation_matches_lone_runs_with_own_teacher_and_temperature(digits):
    split = DeviceSplit(digits.train)
    images = digits.train.images[:1]
    teacher_model = _model(hidden=(64,), dropout=0.0)
    teachers = init_population(teacher_model, _tx(10), member_keys([11, 12, 13]), images).frozen()
    temperatures = jnp.asarray([1.0, 4.0, 20.0])
    alphas = jnp.asarray([0.5, 0.9, 1.0])
    model, tx = _model(), _tx(2 * split.steps_per_epoch(64))

    def population_step(states, batch):
        return population_distill_step(states, batch, teachers, temperatures, alphas, max_shift=1)

    population = _fit(
        init_population(model, tx, member_keys(SEEDS), images), split, population_step, SEEDS
    )
    lone = []
    for m, seed in enumerate(SEEDS):
        step = functools.partial(
            distill_step,
            teacher=member(teachers, m),
            temperature=temperatures[m],
            alpha=alphas[m],
            max_shift=1,
        )
        lone.append(_fit(init_member(model, tx, jax.random.key(seed), images), split, step, seed))
    _assert_members_match(population, lone)


def test_distilling_from_saved_logits_equals_distilling_from_the_teacher(digits):
    """Without jitter, precomputed teacher logits give the same students as the teacher."""
    split = DeviceSplit(digits.train)
    images = digits.train.images[:1]
    teachers = init_population(_model((64,), 0.0), _tx(10), member_keys([5, 6]), images).frozen()
    logits = predict_logits(teachers, split, 100, members=True)
    assert logits.shape == (2, len(digits.train), 10)
    model, tx = _model(), _tx(2 * split.steps_per_epoch(64))
    temperatures, alphas = jnp.asarray([2.0, 8.0]), jnp.asarray([0.9, 0.9])
    seeds = SEEDS[:2]

    def from_teacher(states, batch):
        return population_distill_step(states, batch, teachers, temperatures, alphas)

    def from_logits(states, batch):
        return population_distill_from_logits_step(states, batch, temperatures, alphas)

    start = init_population(model, tx, member_keys(seeds), images)
    a = _fit(start, split, from_teacher, seeds)
    start = init_population(model, tx, member_keys(seeds), images)
    b = _fit(start, DeviceSplit(digits.train, logits), from_logits, seeds)
    _assert_members_match(a, [member(b, m) for m in range(2)])
    # The single-model step reads the same batch field.
    lone = init_member(model, tx, jax.random.key(seeds[0]), images)
    lone = _fit(
        lone,
        DeviceSplit(digits.train, logits[0]),
        functools.partial(distill_from_logits_step, temperature=2.0, alpha=0.9),
        seeds[0],
    )
    _assert_members_match(select_members(a, [0]), [lone])


def test_member_batches_are_the_lone_seed_batches(digits):
    split = DeviceSplit(
        digits.train, np.arange(len(digits.train) * 10, dtype=np.float32).reshape(-1, 10)
    )
    together = next(split.train_batches(32, seed=SEEDS, epoch=1))
    for m, seed in enumerate(SEEDS):
        alone = next(split.train_batches(32, seed=seed, epoch=1))
        for key in ("image", "label", "mask", "teacher_logits"):
            np.testing.assert_array_equal(together[key][m], alone[key])


def test_population_helpers_roundtrip(digits):
    images = digits.train.images[:1]
    population = init_population(_model(), _tx(10), member_keys(SEEDS), images)
    restacked = stack_members([member(population.params, m) for m in range(len(SEEDS))])
    for a, b in zip(
        jax.tree_util.tree_leaves(population.params),
        jax.tree_util.tree_leaves(restacked),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    picked = select_members(population.params, [2, 2, 0])
    first = jax.tree_util.tree_leaves(picked)[0]
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[2], jax.tree_util.tree_leaves(population.params)[0][0])


def test_teacher_logits_of_the_wrong_size_are_refused(digits):
    with pytest.raises(ValueError, match="must have"):
        DeviceSplit(digits.train, np.zeros((10, 10), np.float32))
