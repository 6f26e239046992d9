"""What is trained (:class:`TrainState`) and what only teaches (:class:`FrozenModel`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from kdjax.train.precision import for_compute


class TrainState(train_state.TrainState):
    """Flax's TrainState plus batch-norm statistics and the run's base RNG key.

    ``rng`` never changes: the key of step ``n`` is ``fold_in(rng, n)``, so randomness depends
    only on the step number and a resumed run draws the same dropout masks. ``precision``
    (static, not checkpointed): the forward and backward pass's arithmetic
    (:mod:`kdjax.train.precision`).
    """

    batch_stats: Any
    rng: jax.Array
    precision: str = struct.field(pytree_node=False, default="float32", kw_only=True)

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables as ``model.init`` made them (no empty ``batch_stats``)."""
        if not self.batch_stats:
            return {"params": self.params}
        return {"params": self.params, "batch_stats": self.batch_stats}

    def frozen(self) -> FrozenModel:
        """This state's model, for evaluation or to teach another."""
        return FrozenModel(
            apply_fn=self.apply_fn, variables=self.variables, precision=self.precision
        )


class FrozenModel(struct.PyTreeNode):
    """A model that is only ever applied in inference mode: a teacher, or a model being evaluated.

    It has no optimizer; steps take it as a separate argument and never differentiate it.
    """

    apply_fn: Callable = struct.field(pytree_node=False)
    variables: Any
    precision: str = struct.field(pytree_node=False, default="float32", kw_only=True)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        params, images = for_compute(self.variables["params"], images, self.precision)
        return self.apply_fn({**self.variables, "params": params}, images, train=False)


def create_train_state(
    model: nn.Module,
    variables: dict[str, Any],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    precision: str = "float32",
) -> TrainState:
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=rng,
        precision=precision,
    )
    # A strong int32 step, as a restored checkpoint has: a weakly typed 0 would make a resumed
    # run compile its step a second time.
    return state.replace(step=jnp.zeros((), jnp.int32))
