"""Probabilistic knowledge transfer (Passalis & Tefas, 2018): the student matches the teacher's
conditional distribution of cosine similarities between examples.

With ``c_ij = (cos(e_i, e_j) + 1) / 2`` and ``P_ij = c_ij / sum_k c_ik`` over the valid
examples of a batch, for student (``Q``) and teacher (``P``):
``pkt = mean_ij P_ij * log((P_ij + eps) / (Q_ij + eps))``, ``eps = 1e-7``, the mean over all
valid pairs (RepDistiller's form; its weight: 30000, CE 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.distillers.features import flat, l2_normalize, pair_mask, paired

Array = jax.Array
_EPS = 1e-7


def similarity_distribution(embeddings: Array, mask: Array) -> Array:
    """``[batch, batch]`` rows of ``(cos + 1) / 2`` normalised to sum to 1 over valid columns."""
    e = l2_normalize(flat(embeddings).astype(jnp.float32))
    similar = (e @ e.T + 1.0) / 2.0
    similar = jnp.where(pair_mask(mask), similar, 0.0)
    return similar / jnp.maximum(jnp.sum(similar, axis=1, keepdims=True), 1e-12)


def pkt_loss(student: Array, teacher: Array, mask: Array) -> Array:
    q = similarity_distribution(student, mask)
    p = similarity_distribution(jax.lax.stop_gradient(teacher), mask)
    per_pair = p * jnp.log((p + _EPS) / (q + _EPS))
    pairs = pair_mask(mask)
    return jnp.sum(jnp.where(pairs, per_pair, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)


@DISTILLERS.register("pkt")
@dataclasses.dataclass(frozen=True)
class PKT(Distiller):
    """Term ``pkt`` (:func:`pkt_loss`) on ``student_feature``/``teacher_feature``."""

    student_feature: str = "pre_logits"
    teacher_feature: str = "pre_logits"

    term_names: ClassVar[tuple[str, ...]] = ("pkt",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "pkt": 30000.0}
    feature_based: ClassVar[bool] = True

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        student, teacher = paired(inputs.student_features, inputs.teacher_features, self)
        return {"pkt": pkt_loss(student, teacher, inputs.mask)}, buffers
