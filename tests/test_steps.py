"""The jitted steps: frozen teacher, KD vs CE, determinism, exact evaluation."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.data import DeviceSplit
from kdjax.models import build_model, init_variables
from kdjax.train import (
    create_train_state,
    distill_step,
    evaluate,
    fit,
    make_optimizer,
    train_step,
)


def _state(model_config, images, seed=0, learning_rate=0.1):
    model = build_model(model_config, num_classes=10, field="student.model")
    variables = init_variables(model, jax.random.key(seed), images)
    tx = make_optimizer(
        {"name": "sgd", "learning_rate": learning_rate, "momentum": 0.9},
        total_steps=100,
        field="student.optimizer",
    )
    return create_train_state(model, variables, tx, jax.random.key(seed + 1))


def _batch(digits, n=32):
    return {
        "image": jnp.asarray(digits.train.images[:n]),
        "label": jnp.asarray(digits.train.labels[:n]),
        "mask": jnp.ones((n,), bool),
    }


def _leaves(tree):
    return [np.array(x) for x in jax.tree_util.tree_leaves(tree)]


def test_teacher_is_bit_identical_after_distill_steps(digits):
    teacher = _state(
        {"name": "cnn", "channels": (4, 8), "dense_size": 16}, digits.train.images
    ).frozen()
    before = copy.deepcopy(_leaves(teacher.variables))
    student = _state({"name": "mlp", "hidden_sizes": (32,)}, digits.train.images)
    batch = _batch(digits)
    for _ in range(5):
        student, metrics = distill_step(
            student, batch, teacher=teacher, temperature=jnp.float32(4.0), alpha=jnp.float32(0.9)
        )
    after = _leaves(teacher.variables)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert int(student.step) == 5
    assert set(metrics) >= {"loss", "hard_ce", "soft_kl", "teacher_agreement", "accuracy"}


def test_distill_with_alpha_zero_is_plain_training(digits):
    teacher = _state({"name": "mlp", "hidden_sizes": (64,)}, digits.train.images, seed=5).frozen()
    config = {"name": "mlp", "hidden_sizes": (32,), "dropout_rate": 0.2}
    batch = _batch(digits)
    a, ma = train_step(_state(config, digits.train.images), batch)
    b, mb = distill_step(
        _state(config, digits.train.images),
        batch,
        teacher=teacher,
        temperature=jnp.float32(3.0),
        alpha=jnp.float32(0.0),
    )
    for x, y in zip(_leaves(a.params), _leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert float(ma["loss"]) == pytest.approx(float(mb["hard_ce"]), rel=1e-6)


def test_distill_gradient_is_kd_loss_gradient(digits):
    """One plain-SGD step moves the student by -lr * grad of kd_loss (computed independently)."""
    from kdjax.losses import kd_loss

    images = digits.train.images
    teacher = _state({"name": "mlp", "hidden_sizes": (64,)}, images, seed=3).frozen()
    model = build_model({"name": "mlp", "hidden_sizes": (16,)}, num_classes=10, field="s")
    variables = init_variables(model, jax.random.key(0), images)
    state = create_train_state(model, variables, optax.sgd(1.0), jax.random.key(1))
    batch = _batch(digits)

    def objective(params):
        logits, _ = model.apply({"params": params}, batch["image"], train=False)
        t_logits, _ = teacher(batch["image"])
        return kd_loss(logits, t_logits, batch["label"], 4.0, 0.7)

    expected = jax.tree_util.tree_map(
        lambda p, g: p - g, variables["params"], jax.grad(objective)(variables["params"])
    )
    state, _ = distill_step(
        state, batch, teacher=teacher, temperature=jnp.float32(4.0), alpha=jnp.float32(0.7)
    )
    for x, y in zip(_leaves(state.params), _leaves(expected), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_steps_are_deterministic_including_dropout(digits):
    config = {"name": "mlp", "hidden_sizes": (32,), "dropout_rate": 0.5}
    batch = _batch(digits)
    a, _ = train_step(_state(config, digits.train.images), batch)
    b, _ = train_step(_state(config, digits.train.images), batch)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            _leaves((a.params, a.opt_state)), _leaves((b.params, b.opt_state)), strict=True
        )
    )


def test_batch_norm_statistics_update_in_training_only(digits):
    state = _state({"name": "cnn", "channels": (4,), "dense_size": 8}, digits.train.images)
    before = _leaves(state.batch_stats)
    state, _ = train_step(state, _batch(digits))
    after = _leaves(state.batch_stats)
    assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("batch_size", [1, 7, 64, 359, 360, 1000])
def test_eval_is_exact_with_a_partial_last_batch(digits, batch_size):
    state = _state({"name": "mlp", "hidden_sizes": (32,)}, digits.train.images)
    model = state.frozen()
    logits, _ = model(jnp.asarray(digits.test.images))
    predictions = np.asarray(jnp.argmax(logits, -1))
    expected_errors = int(np.sum(predictions != digits.test.labels))
    scores = evaluate(model, DeviceSplit(digits.test), batch_size)
    assert scores["count"] == 360
    assert scores["errors"] == expected_errors
    assert scores["accuracy"] == pytest.approx(1 - expected_errors / 360, abs=0)


def test_student_learns_digits(digits):
    state = _state({"name": "mlp", "hidden_sizes": (64,)}, digits.train.images)
    train = DeviceSplit(digits.train)
    result = fit(state, train, train_step, epochs=8, batch_size=32, seed=0)
    scores = evaluate(result.state.frozen(), DeviceSplit(digits.test), 128)
    assert scores["accuracy"] > 0.93
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 3
