"""Similarity-preserving distillation (Tung & Mori, 2019): examples that the teacher finds
alike, the student must find alike.

With ``F`` a stage's activations flattened to ``[batch, elements]``, ``G = F F^T`` with each
row L2-normalised: ``sp = ||G^S - G^T||_F^2 / b^2`` over the ``b`` valid examples (RepDistiller
reads the last stage before pooling; its weight: 3000, CE 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.distillers.features import flat, l2_normalize, pair_mask, paired

Array = jax.Array


def similarity_matrix(features: Array, mask: Array) -> Array:
    """Row-normalised ``F F^T`` over valid examples (invalid rows and columns are zero)."""
    f = flat(features).astype(jnp.float32)
    gram = jnp.where(pair_mask(mask), f @ f.T, 0.0)
    return l2_normalize(gram)


def sp_loss(student: Array, teacher: Array, mask: Array) -> Array:
    diff = similarity_matrix(student, mask) - similarity_matrix(
        jax.lax.stop_gradient(teacher), mask
    )
    valid = jnp.sum(mask.astype(jnp.float32))
    return jnp.sum(diff**2) / jnp.maximum(valid * valid, 1.0)


@DISTILLERS.register("sp")
@dataclasses.dataclass(frozen=True)
class SP(Distiller):
    """Term ``sp`` (:func:`sp_loss`) on ``student_feature``/``teacher_feature``."""

    student_feature: str = "stage2"
    teacher_feature: str = "stage2"

    term_names: ClassVar[tuple[str, ...]] = ("sp",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "sp": 3000.0}
    feature_based: ClassVar[bool] = True

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        student, teacher = paired(inputs.student_features, inputs.teacher_features, self)
        return {"sp": sp_loss(student, teacher, inputs.mask)}, buffers
