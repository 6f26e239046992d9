"""Small helpers shared by the feature-based distillers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def feature(features: Mapping[str, Array], name: str, whose: str) -> Array:
    """``features[name]``, or a ValueError naming the features the model has."""
    if name not in features:
        raise ValueError(
            f"the {whose} model has no feature {name!r}; it has {', '.join(sorted(features))}. "
            f"Set the distiller's {whose}_feature(s) to one of those."
        )
    return features[name]


def paired(
    student_features: Mapping[str, Array],
    teacher_features: Mapping[str, Array],
    distiller: Any,
) -> tuple[Array, Array]:
    """(student, teacher) features named by ``distiller.student_feature`` and
    ``distiller.teacher_feature`` (a ValueError naming what each model has, if missing)."""
    return (
        feature(student_features, distiller.student_feature, "student"),
        feature(teacher_features, distiller.teacher_feature, "teacher"),
    )


def flat(x: Array) -> Array:
    """``[batch, ...]`` -> ``[batch, elements]``."""
    return x.reshape((x.shape[0], -1))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` (PyTorch's ``F.normalize``): a zero vector stays zero, never NaN.

    Written with ``rsqrt(max(||x||^2, eps^2))``: the square root's derivative at 0 is infinite,
    and ``max`` sends a zero vector's gradient to the constant branch instead.
    """
    squared = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def pair_mask(mask: Array) -> Array:
    """``[batch, batch]``: true where both examples are valid."""
    mask = mask.astype(bool)
    return mask[:, None] & mask[None, :]
