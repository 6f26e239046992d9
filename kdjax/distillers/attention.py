"""Attention transfer (Zagoruyko & Komodakis, 2017): the student matches the teacher's spatial
attention maps, stage by stage.

An attention map is the channel mean of the squared activations, flattened and L2-normalised
per example: ``a(F) = vec(mean_c F_c^2) / ||vec(mean_c F_c^2)||``. For each pair of stages,
``at = mean_i mean_j (a(S)_ij - a(T)_ij)^2`` over valid examples ``i`` and positions ``j``; the
term sums the pairs (RepDistiller's form of the paper's ``beta/2 * ||a_S - a_T||_2``, with its
weight 1000). A pair of maps of different sizes is compared after average-pooling the larger
feature map down to the smaller size (a whole-number factor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms
from kdjax.distillers.features import feature, flat, l2_normalize
from kdjax.losses.classification import masked_mean

Array = jax.Array


def attention_map(features: Array) -> Array:
    """``[batch, h, w, c]`` -> ``[batch, h * w]``: L2-normalised channel mean of squares."""
    features = features.astype(jnp.float32)
    return l2_normalize(flat(jnp.mean(features**2, axis=-1)))


def _pool_to(features: Array, height: int) -> Array:
    if features.shape[1] == height:
        return features
    factor = features.shape[1] // height
    if factor * height != features.shape[1] or features.shape[2] % factor:
        raise ValueError(
            f"attention transfer: feature maps {features.shape[1:3]} and {height} in height do "
            "not differ by a whole-number factor; pair stages of compatible sizes"
        )
    return nn.avg_pool(features, (factor, factor), strides=(factor, factor))


def attention_transfer_loss(
    student_features: Array, teacher_features: Array, mask: Array | None = None
) -> Array:
    """One stage pair's term, ``mean_i mean_j (a(S)_ij - a(T)_ij)^2`` (see the module doc)."""
    height = min(student_features.shape[1], teacher_features.shape[1])
    student_map = attention_map(_pool_to(student_features, height))
    teacher_map = attention_map(_pool_to(jax.lax.stop_gradient(teacher_features), height))
    return masked_mean(jnp.mean((student_map - teacher_map) ** 2, axis=-1), mask)


@DISTILLERS.register("at")
@dataclasses.dataclass(frozen=True)
class AttentionTransfer(Distiller):
    """Term ``at``: the sum of :func:`attention_transfer_loss` over the stage pairs
    ``zip(student_features, teacher_features)``. RepDistiller's weights: CE 1, AT 1000."""

    student_features: tuple[str, ...] = ("stage1", "stage2")
    teacher_features: tuple[str, ...] = ("stage1", "stage2")

    term_names: ClassVar[tuple[str, ...]] = ("at",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "at": 1000.0}
    feature_based: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if len(self.student_features) != len(self.teacher_features) or not self.student_features:
            raise ValueError(
                f"student_features {self.student_features} and teacher_features "
                f"{self.teacher_features} must name the same number (>= 1) of stages, in pairs"
            )

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        total = jnp.zeros((), jnp.float32)
        for s_name, t_name in zip(self.student_features, self.teacher_features, strict=True):
            student = feature(inputs.student_features, s_name, "student")
            teacher = feature(inputs.teacher_features, t_name, "teacher")
            total = total + attention_transfer_loss(student, teacher, inputs.mask)
        return {"at": total}, buffers
