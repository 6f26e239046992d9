"""Hinton et al. (2015) soft targets, from one teacher or an ensemble.

An ensemble's soft targets are the average of its members' *tempered probabilities*,
``p = (1/K) sum_k softmax(t_k / T)``, not the softmax of averaged logits: averaging logits
would let one over-confident teacher dominate and is not what "the ensemble's prediction"
means. All K teachers run in the same compiled step as the student.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.losses.classification import _as_float, masked_mean

Array = jax.Array


def ensemble_log_probs(teacher_logits: Array, temperature: float | Array) -> Array:
    """``log((1/K) sum_k softmax(t_k / T))`` for logits ``[K, batch, classes]``, computed as a
    log-sum-exp of log-probabilities (exact for K = 1, finite where a probability underflows)."""
    temperature = _as_float(temperature)
    log_probs = jax.nn.log_softmax(_as_float(teacher_logits) / temperature, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(jnp.float32(log_probs.shape[0]))


def ensemble_soft_kl(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array,
    mask: Array | None = None,
) -> Array:
    """``T^2 * mean_i KL(p_i || softmax(s_i / T))`` with ``p`` the ensemble's averaged tempered
    probabilities (:func:`ensemble_log_probs`); :func:`kdjax.losses.soft_kl` when K = 1.

    Args:
      student_logits: ``[batch, classes]``.
      teacher_logits: ``[K, batch, classes]``.
    """
    temperature = _as_float(temperature)
    log_p = ensemble_log_probs(teacher_logits, temperature)
    log_q = jax.nn.log_softmax(_as_float(student_logits) / temperature, axis=-1)
    per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature**2 * masked_mean(per_example, mask)


@DISTILLERS.register("kd")
@dataclasses.dataclass(frozen=True)
class KD(Distiller):
    """Term ``kd``: :func:`ensemble_soft_kl` at ``temperature``. CRD-paper weights: 0.1 CE +
    0.9 KD at T = 4."""

    temperature: float = 4.0

    term_names: ClassVar[tuple[str, ...]] = ("kd",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 0.1, "kd": 0.9}

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        kd = ensemble_soft_kl(
            inputs.student_logits, inputs.teacher_logits, self.temperature, inputs.mask
        )
        return {"kd": kd}, buffers
