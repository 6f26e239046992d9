"""Decoupled knowledge distillation (Zhao et al., 2022): KD split into its target and
non-target parts, weighted separately.

With ``p = softmax(t / T)``, ``q = softmax(s / T)`` and ``y`` the label:

- ``tckd = T^2 * mean_i KL(b(p_i) || b(q_i))``, ``b(p) = (p_y, 1 - p_y)`` the binary
  target / non-target probabilities;
- ``nckd = T^2 * mean_i KL(p_hat_i || q_hat_i)``, ``p_hat`` the distribution over the
  non-target classes, ``p_c / (1 - p_y)`` for ``c != y``.

Both are computed in log space (``log(1 - p_y)`` as a log-sum-exp over the non-target classes),
so they stay finite for confident teachers. mdistiller's weights: CE 1, TCKD 1 (alpha),
NCKD 8 (beta), T = 4, the teacher terms ramped up over the first 20 epochs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.distillers.kd import ensemble_log_probs
from kdjax.losses.classification import _as_float, masked_mean

Array = jax.Array


def _kl(log_p: Array, log_q: Array, where: Array | None = None) -> Array:
    """``sum_c p_c (log p_c - log q_c)`` over the last axis (optionally over ``where`` only)."""
    terms = jnp.exp(log_p) * (log_p - log_q)
    if where is not None:
        terms = jnp.where(where, terms, 0.0)
    return jnp.sum(terms, axis=-1)


def _split_target(log_probs: Array, target: Array) -> tuple[Array, Array, Array]:
    """(log p_y, log(1 - p_y), log p_hat) for log-probabilities ``[batch, classes]``."""
    log_target = jnp.sum(jnp.where(target, log_probs, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_probs), axis=-1)
    log_hat = jnp.where(target, 0.0, log_probs - log_rest[:, None])
    return log_target, log_rest, log_hat


def dkd_terms(
    student_logits: Array,
    teacher_log_probs: Array,
    labels: Array,
    temperature: float | Array,
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """(tckd, nckd) as in the module doc, from the teacher's tempered log-probabilities."""
    temperature = _as_float(temperature)
    log_q = jax.nn.log_softmax(_as_float(student_logits) / temperature, axis=-1)
    target = jax.nn.one_hot(labels, log_q.shape[-1], dtype=bool)
    p_y, p_rest, p_hat = _split_target(teacher_log_probs, target)
    q_y, q_rest, q_hat = _split_target(log_q, target)
    binary = _kl(jnp.stack([p_y, p_rest], -1), jnp.stack([q_y, q_rest], -1))
    non_target = _kl(p_hat, q_hat, where=~target)
    scale = temperature**2
    return scale * masked_mean(binary, mask), scale * masked_mean(non_target, mask)


@DISTILLERS.register("dkd")
@dataclasses.dataclass(frozen=True)
class DKD(Distiller):
    """Terms ``tckd`` and ``nckd`` (:func:`dkd_terms`); an ensemble's soft targets are its
    averaged tempered probabilities, as for KD."""

    temperature: float = 4.0

    term_names: ClassVar[tuple[str, ...]] = ("tckd", "nckd")
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "tckd": 1.0, "nckd": 8.0}
    default_warmup_epochs: ClassVar[float] = 20.0

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        teacher = ensemble_log_probs(inputs.teacher_logits, self.temperature)
        tckd, nckd = dkd_terms(
            inputs.student_logits, teacher, inputs.labels, self.temperature, inputs.mask
        )
        return {"tckd": tckd, "nckd": nckd}, buffers
