"""Jitter, the max-norm constraint, validation carve-outs and the host-side scores."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import scores
from kdjax.data.augment import random_translate
from kdjax.data.datasets import Split, split_off_validation, validation_indices
from kdjax.errors import DataError
from kdjax.train.optim import make_optimizer, max_norm_projection


def _shift_by_hand(image, dy, dx):
    """``image`` translated by (dy, dx) pixels, zeros where nothing moved in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    src = image[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def test_random_translate_is_a_zero_filled_shift_within_range():
    images = np.arange(64 * 6 * 5, dtype=np.float32).reshape(64, 6, 5, 1) + 1.0
    shifted = np.asarray(random_translate(jnp.asarray(images), jax.random.key(0), 2))
    seen = set()
    for image, out in zip(images, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(out, _shift_by_hand(image, dy, dx))
        ]
        assert len(matches) == 1, "each output is exactly one shift of its input"
        seen.add(matches[0])
    assert len(seen) > 15  # of the 25 possible shifts, most occur in 64 draws


def test_random_translate_zero_is_identity_and_key_determines_it():
    images = jnp.asarray(np.random.default_rng(0).random((8, 5, 5, 1), dtype=np.float32))
    assert random_translate(images, jax.random.key(1), 0) is images
    a = random_translate(images, jax.random.key(1), 1)
    b = random_translate(images, jax.random.key(1), 1)
    c = random_translate(images, jax.random.key(2), 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_max_norm_caps_each_units_incoming_weights_and_leaves_the_rest():
    params = {
        "kernel": jnp.asarray([[3.0, 0.1], [4.0, 0.2]]),  # column norms 5 and ~0.22
        "bias": jnp.asarray([10.0, -10.0]),
    }
    tx = optax.chain(optax.sgd(1.0), max_norm_projection(2.0))
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"][:, 0], [1.2, 1.6], rtol=1e-6)  # 2 * (3, 4) / 5
    np.testing.assert_allclose(new["kernel"][:, 1], [0.1, 0.2], rtol=1e-6)  # under the cap
    np.testing.assert_array_equal(new["bias"], params["bias"])  # biases are never capped


def test_make_optimizer_adds_max_norm_only_when_asked():
    params = {"kernel": jnp.full((4, 3), 10.0)}
    grads = {"kernel": jnp.zeros((4, 3))}
    for max_norm, expected in ((0.0, 20.0), (3.0, 3.0)):
        cfg = {"name": "sgd", "learning_rate": 0.1, "max_norm": max_norm}
        tx = make_optimizer(cfg, total_steps=10, field="o")
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.linalg.norm(new["kernel"], axis=0), expected, rtol=1e-6)


def test_validation_carve_out_is_fixed_disjoint_and_complete():
    kept, held = validation_indices(100, 10)
    assert len(held) == 10 and len(kept) == 90
    assert not set(kept) & set(held) and set(kept) | set(held) == set(range(100))
    np.testing.assert_array_equal(held, validation_indices(100, 10)[1])
    split = Split(np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1), np.arange(100) % 10)
    rest, validation = split_off_validation(split, 10)
    np.testing.assert_array_equal(validation.images[:, 0, 0, 0], held)
    assert len(rest) == 90
    for bad in (0, 100, 150):
        with pytest.raises(DataError, match="must be between 1 and 99"):
            validation_indices(100, bad)


def test_split_with_classes_keeps_and_drops():
    split = Split(np.zeros((10, 1, 1, 1), np.float32), np.arange(10) % 5)
    assert sorted(split.with_classes(drop=[3]).labels) == [0, 0, 1, 1, 2, 2, 4, 4]
    assert sorted(split.with_classes(keep=[1, 2]).labels) == [1, 1, 2, 2]


def test_errors_and_bias_shifts_by_hand():
    logits = np.asarray([[2.0, 1.0, 1.5], [0.0, 1.5, 1.0], [0.0, 0.2, 0.1], [1.0, 0.0, 3.0]])
    labels = np.asarray([0, 2, 2, 2])
    assert scores.errors(logits, labels) == 2  # rows 1 and 2 pick class 1
    assert scores.errors_on_class(logits, labels, 2) == 2
    shifted = scores.shift_bias(logits, [2], 0.6)
    np.testing.assert_allclose(shifted[:, 2], [2.1, 1.6, 0.7, 3.6])
    assert scores.errors(shifted, labels) == 1  # rows 1 and 2 fixed, row 0 broken (2.1 > 2)
    assert scores.errors_on_class(shifted, labels, 2) == 0
    # Shifts 0.2, 0.55, 0.6 and 2.5 all leave one error; ties go to the smallest in magnitude.
    candidates = np.asarray([0.0, 0.6, 0.55, 0.2, 2.5])
    assert scores.best_bias_shift(logits, labels, [2], candidates) == (0.2, 1)
    members = np.stack([logits, shifted])
    np.testing.assert_array_equal(scores.errors(members, labels), [2, 1])


def test_mean_std_is_the_sample_std():
    assert scores.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, 1.2909944))
    assert scores.mean_std([7.0]) == (7.0, 0.0)
