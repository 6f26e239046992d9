"""Mixed precision: bfloat16 arithmetic, float32 for everything that accumulates.

``performance.precision = "bfloat16"`` runs every model's forward and backward pass in
bfloat16: the step casts the parameters and the images to it as it applies the model, so
convolutions and matmuls (and their gradients) run in bfloat16. What is kept in float32:

- the parameters, their gradients (the cast's gradient casts back) and the optimizer state;
- batch-norm statistics: moments are computed and running averages kept in float32
  (:mod:`kdjax.models.norm`);
- every loss and metric: the losses promote logits to float32 before any softmax or
  reduction (:mod:`kdjax.losses`).

A teacher and an evaluated model (:class:`~kdjax.train.state.FrozenModel`) compute the same
way. ``float32`` (the default) changes nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_precision(precision: Any, field: str = "performance.precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"{field}={precision!r} must be one of {', '.join(PRECISIONS)} (bfloat16: compute "
            "in bfloat16, keep parameters, optimizer state and losses in float32)."
        )
    return precision


def for_compute(params: Any, images: jax.Array, precision: str) -> tuple[Any, jax.Array]:
    """``(params, images)`` as the model computes with them under ``precision``."""
    if precision == "float32":
        return params, images
    dtype = PRECISIONS[precision]

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, params), cast(images)
