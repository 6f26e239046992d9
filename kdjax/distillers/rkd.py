"""Relational knowledge distillation (Park et al., 2019): the student's embeddings keep the
teacher's distances between examples and angles between triplets.

With ``e`` the embeddings (``pre_logits``) of the valid examples of a batch:

- distance: ``d_ij = ||e_i - e_j|| / mu``, ``mu`` the mean of the positive ``d``'s;
  ``rkd_distance = mean_ij huber(d^S_ij - d^T_ij)`` over all pairs (the diagonal included);
- angle: ``a_ijk = <u_ij, u_ik>``, ``u_ij = (e_j - e_i) / ||e_j - e_i||``;
  ``rkd_angle = mean_ijk huber(a^S_ijk - a^T_ijk)``;

``huber`` the smooth L1 loss with threshold 1. RepDistiller's weights: CE 1, distance 25,
angle 50.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.distillers.features import flat, l2_normalize, pair_mask, paired

Array = jax.Array


def smooth_l1(x: Array) -> Array:
    """``0.5 x^2`` for ``|x| < 1``, else ``|x| - 0.5``."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x < 1.0, 0.5 * x * x, abs_x - 0.5)


def _weighted_mean(values: Array, weights: Array) -> Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def normalized_distances(embeddings: Array, mask: Array) -> Array:
    """``[batch, batch]`` Euclidean distances divided by their mean over valid distinct pairs."""
    e = flat(embeddings).astype(jnp.float32)
    squared = jnp.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1)
    # sqrt at 0 has an infinite derivative: clip first, then put exact zeros back.
    distances = jnp.where(squared > 1e-12, jnp.sqrt(jnp.maximum(squared, 1e-12)), 0.0)
    positive = pair_mask(mask) & (distances > 0)
    return distances / jnp.maximum(_weighted_mean(distances, positive), 1e-12)


def triplet_angles(embeddings: Array) -> Array:
    """``[batch, batch, batch]`` cosines between ``e_j - e_i`` and ``e_k - e_i``."""
    e = flat(embeddings).astype(jnp.float32)
    units = l2_normalize(e[None, :, :] - e[:, None, :])  # [i, j, d]
    return jnp.einsum("ijd,ikd->ijk", units, units)


def rkd_distance_loss(student: Array, teacher: Array, mask: Array) -> Array:
    teacher = jax.lax.stop_gradient(teacher)
    diff = normalized_distances(student, mask) - normalized_distances(teacher, mask)
    return _weighted_mean(smooth_l1(diff), pair_mask(mask))


def rkd_angle_loss(student: Array, teacher: Array, mask: Array) -> Array:
    teacher = jax.lax.stop_gradient(teacher)
    diff = triplet_angles(student) - triplet_angles(teacher)
    valid = mask.astype(bool)
    triplets = valid[:, None, None] & valid[None, :, None] & valid[None, None, :]
    return _weighted_mean(smooth_l1(diff), triplets)


@DISTILLERS.register("rkd")
@dataclasses.dataclass(frozen=True)
class RKD(Distiller):
    """Terms ``rkd_distance`` and ``rkd_angle`` on ``student_feature``/``teacher_feature``."""

    student_feature: str = "pre_logits"
    teacher_feature: str = "pre_logits"

    term_names: ClassVar[tuple[str, ...]] = ("rkd_distance", "rkd_angle")
    default_weights: ClassVar[dict[str, float]] = {
        "ce": 1.0,
        "rkd_distance": 25.0,
        "rkd_angle": 50.0,
    }
    feature_based: ClassVar[bool] = True

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        student, teacher = paired(inputs.student_features, inputs.teacher_features, self)
        return {
            "rkd_distance": rkd_distance_loss(student, teacher, inputs.mask),
            "rkd_angle": rkd_angle_loss(student, teacher, inputs.mask),
        }, buffers
