"""Losses on class logits: hard-label cross-entropy and Hinton et al.'s soft-target KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _as_float(x: Array) -> Array:
    """Upcasts bf16/fp16 to float32 (softmax of half-precision logits loses the tail)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(per_example: Array, mask: Array | None) -> Array:
    """Mean of ``per_example`` over the examples where ``mask`` is true.

    An all-false mask gives 0 rather than NaN, so a fully padded batch is harmless.
    """
    if mask is None:
        return jnp.mean(per_example)
    weights = jnp.asarray(mask).astype(per_example.dtype)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Hard-label cross-entropy, averaged over valid examples.

    ``CE = mean_i [ -log softmax(z_i)[y_i] ]``

    Args:
      logits: ``[batch, classes]``.
      labels: ``[batch]`` integer class indices in ``[0, classes)``.
      mask: optional ``[batch]`` booleans; false rows (padding) are ignored.
    """
    log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return masked_mean(-picked, mask)


def soft_kl(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array,
    mask: Array | None = None,
) -> Array:
    """Soft-target distillation term of Hinton, Vinyals & Dean (2015).

    ``soft_kl = T^2 * mean_i sum_c p_c (log p_c - log q_c)``,
    with ``p = softmax(t_i / T)`` (teacher) and ``q = softmax(s_i / T)`` (student): the KL
    divergence ``KL(p || q)`` summed over classes and averaged over valid examples ("batchmean").

    The ``T^2`` factor keeps the gradient's scale independent of the temperature: the gradient
    with respect to the student logits is ``T * (q - p) / batch``.

    Args:
      student_logits: ``[batch, classes]``.
      teacher_logits: ``[batch, classes]``; no gradient flows through the teacher in kdjax's
        steps, but this function itself does not stop it.
      temperature: ``T > 0``; a Python float or a traced scalar (so sweeps need no recompile).
      mask: optional ``[batch]`` booleans; false rows (padding) are ignored.
    """
    temperature = _as_float(temperature)
    log_q = jax.nn.log_softmax(_as_float(student_logits) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(_as_float(teacher_logits) / temperature, axis=-1)
    p = jnp.exp(log_p)
    # Where p underflows to 0 its term is 0 (the limit of p log p); log_p stays finite, so the
    # product is an exact 0 rather than 0 * inf = NaN.
    per_example = jnp.sum(p * (log_p - log_q), axis=-1)
    return temperature**2 * masked_mean(per_example, mask)


def kd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    temperature: float | Array,
    alpha: float | Array,
    mask: Array | None = None,
) -> Array:
    """Hinton's distillation objective: ``(1 - alpha) * CE(s, y) + alpha * soft_kl(s, t, T)``.

    ``alpha`` weighs the teacher's soft targets; the hard-label term always uses temperature 1.
    """
    hard = cross_entropy(student_logits, labels, mask)
    soft = soft_kl(student_logits, teacher_logits, temperature, mask)
    return mix_hard_soft(hard, soft, alpha)


def mix_hard_soft(hard: Array, soft: Array, alpha: float | Array) -> Array:
    """The one place the KD weights are applied: ``(1 - alpha) * hard + alpha * soft``."""
    return (1.0 - alpha) * hard + alpha * soft
