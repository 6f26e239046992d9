"""Losses against hand-computed values, closed-form gradients and float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

STUDENT = jnp.array([[1.0, 2.0, 0.5], [0.2, -1.0, 1.5]])
TEACHER = jnp.array([[2.0, 1.0, 0.1], [0.0, 0.5, 2.5]])
LABELS = jnp.array([1, 2])


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def soft_kl_reference(s, t, temperature):
    """float64 numpy: T^2 * mean_i sum_c p log(p / q)."""
    log_p = _log_softmax64(np.asarray(t, np.float64) / temperature)
    log_q = _log_softmax64(np.asarray(s, np.float64) / temperature)
    return temperature**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))


def test_hand_computed_values():
    # By hand: CE = (-log softmax([1,2,.5])[1] - log softmax([.2,-1,1.5])[2]) / 2.
    assert float(losses.cross_entropy(STUDENT, LABELS)) == pytest.approx(0.383944, abs=1e-6)
    assert float(losses.soft_kl(STUDENT, TEACHER, 2.0)) == pytest.approx(0.285472, abs=1e-6)
    kd = losses.kd_loss(STUDENT, TEACHER, LABELS, temperature=4.0, alpha=0.5)
    assert float(kd) == pytest.approx(0.340683, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 20.0])
def test_soft_kl_gradient_is_closed_form(temperature):
    grad = jax.grad(losses.soft_kl)(STUDENT, TEACHER, temperature)
    q = jax.nn.softmax(STUDENT / temperature)
    p = jax.nn.softmax(TEACHER / temperature)
    expected = temperature * (q - p) / STUDENT.shape[0]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_soft_kl_is_zero_when_student_equals_teacher():
    logits = jax.random.normal(jax.random.key(0), (16, 10)) * 5
    for temperature in (0.05, 1.0, 100.0):
        assert float(losses.soft_kl(logits, logits, temperature)) == 0.0


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 4.0, 20.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_soft_kl_finite_and_correct_at_extremes(temperature, scale):
    k1, k2 = jax.random.split(jax.random.key(1))
    s = jax.random.normal(k1, (8, 10)) * scale
    t = jax.random.normal(k2, (8, 10)) * scale
    value = float(losses.soft_kl(s, t, temperature))
    reference = soft_kl_reference(s, t, temperature)
    assert np.isfinite(value)
    assert value == pytest.approx(reference, rel=1e-4, abs=1e-5 * temperature**2)
    grad = jax.grad(losses.soft_kl)(s, t, temperature)
    assert np.all(np.isfinite(grad))
    ce = losses.cross_entropy(s, jnp.arange(8) % 10)
    assert np.isfinite(float(ce))


def test_cross_entropy_with_huge_logits_matches_float64():
    logits = jnp.array([[1e4, -1e4, 0.0], [-3e3, 2e3, 2e3 + 1.0]])
    labels = jnp.array([1, 2])
    ref = -np.mean([_log_softmax64(logits)[i, y] for i, y in enumerate([1, 2])])
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_upcast(dtype):
    s, t = STUDENT.astype(dtype), TEACHER.astype(dtype)
    for value, full in [
        (
            losses.soft_kl(s, t, 2.0),
            losses.soft_kl(s.astype(jnp.float32), t.astype(jnp.float32), 2.0),
        ),
        (losses.cross_entropy(s, LABELS), losses.cross_entropy(s.astype(jnp.float32), LABELS)),
    ]:
        assert value.dtype == jnp.float32
        assert float(value) == pytest.approx(float(full), rel=1e-6)
    # fp16 logits of 1e4 at T=0.05 would overflow fp16 arithmetic (6.5e4 max) if not upcast.
    big = jnp.array([[6e4, -6e4, 0.0]], dtype=jnp.float16)
    assert np.isfinite(float(losses.soft_kl(big, -big, 0.05)))


def test_mask_ignores_padding_rows():
    padded_s = jnp.concatenate([STUDENT, jnp.full((3, 3), 1e3)])
    padded_t = jnp.concatenate([TEACHER, jnp.full((3, 3), -7.0)])
    padded_y = jnp.concatenate([LABELS, jnp.array([0, 0, 0])])
    mask = jnp.array([True, True, False, False, False])
    assert float(losses.soft_kl(padded_s, padded_t, 2.0, mask)) == pytest.approx(0.285472, abs=1e-6)
    assert float(losses.cross_entropy(padded_s, padded_y, mask)) == pytest.approx(
        0.383944, abs=1e-6
    )
    kd = losses.kd_loss(padded_s, padded_t, padded_y, temperature=4.0, alpha=0.5, mask=mask)
    assert float(kd) == pytest.approx(0.340683, abs=1e-6)
    assert float(losses.cross_entropy(STUDENT, LABELS, jnp.zeros(2, bool))) == 0.0


def test_kd_loss_endpoints_and_hard_term_ignores_temperature():
    ce = float(losses.cross_entropy(STUDENT, LABELS))
    for temperature in (1.0, 4.0, 20.0):
        assert float(losses.kd_loss(STUDENT, TEACHER, LABELS, temperature, 0.0)) == pytest.approx(
            ce
        )
        assert float(losses.kd_loss(STUDENT, TEACHER, LABELS, temperature, 1.0)) == pytest.approx(
            float(losses.soft_kl(STUDENT, TEACHER, temperature))
        )
