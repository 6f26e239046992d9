"""Batch normalisation whose statistics are those of the *global* batch, padding left out.

Every kdjax model normalises with :class:`BatchNorm`. Its arithmetic is flax's
``nn.BatchNorm`` (same variables, ``E[x^2] - E[x]^2`` variance, running averages updated with
``momentum``), but where the batch statistics come from is set by the training step that applies
the model, through :func:`batch_statistics`:

- ``mask``: the batch's valid rows. A batch padded to fill every device (a ragged last batch
  on 8 devices) normalises over its real examples only, exactly as the unpadded batch would on
  one device.
- ``axis_name``: under ``jax.pmap`` each device holds a slice of the batch; the sums and counts
  are ``psum``-ed over this axis, so the statistics are the global batch's (flax's own
  ``axis_name`` averages per-device means, which is wrong once devices hold different numbers
  of valid rows). Under sharded ``jax.jit`` nothing is needed: the step sees the global batch
  and XLA inserts the collectives.

The setting lives in a context variable that the step sets *inside* its traced body from its own
arguments, so it is part of what is compiled: it never leaks between steps or into evaluation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class _Statistics:
    mask: jax.Array | None = None  # [batch] bool
    axis_name: str | None = None


_NONE = _Statistics()
_CURRENT: contextvars.ContextVar[_Statistics | None] = contextvars.ContextVar(
    "kdjax_batch_statistics", default=None
)


@contextlib.contextmanager
def batch_statistics(mask: jax.Array | None = None, axis_name: str | None = None) -> Iterator[None]:
    """Within this block, training-mode :class:`BatchNorm` layers compute their statistics over
    the rows where ``mask`` is true, summed over the mapped ``axis_name`` if one is given."""
    token = _CURRENT.set(_Statistics(mask, axis_name))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def batch_moments(
    x: jax.Array, mask: jax.Array | None = None, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and variance of ``x`` (features last) over its valid rows.

    ``var = max(0, E[x^2] - E[x]^2)``, with both expectations ``psum(sum) / psum(count)`` over
    ``axis_name``; without mask and axis, exactly flax's ``x.mean(axes)`` arithmetic.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    if mask is None and axis_name is None:
        mean, mean_sq = x.mean(axes), (x * x).mean(axes)
    else:
        if mask is None:
            mask = jnp.ones(x.shape[:1], bool)
        rows = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        sums = jnp.sum(jnp.where(rows, x, 0.0), axes)
        sums_sq = jnp.sum(jnp.where(rows, x * x, 0.0), axes)
        # Every row has the same number of positions (height x width for a conv feature map).
        count = jnp.sum(mask.astype(x.dtype)) * (x[0].size // x.shape[-1])
        if axis_name is not None:
            sums, sums_sq, count = jax.lax.psum((sums, sums_sq, count), axis_name)
        count = jnp.maximum(count, 1.0)
        mean, mean_sq = sums / count, sums_sq / count
    return mean, jnp.maximum(0.0, mean_sq - mean * mean)


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over all axes but the last, with kdjax's global, masked statistics.

    Variables as flax names them: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.
    """

    use_running_average: bool
    momentum: float = 0.9  # flax's convention: PyTorch's momentum 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            statistics = _CURRENT.get() or _NONE
            mean, var = batch_moments(x, statistics.mask, statistics.axis_name)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        y = x - mean
        y = y * (jax.lax.rsqrt(var + self.epsilon) * scale)
        return (y + bias).astype(jnp.result_type(x, scale))
