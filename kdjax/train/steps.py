"""The jitted steps: each a module-level pure function, compiled once, the train state donated.

- :func:`train_step`: hard-label training (teacher fitting, students from scratch).
- :func:`distill_step`: Hinton KD; the teacher is a separate :class:`FrozenModel` applied in
  inference mode under ``stop_gradient`` and never seen by the optimizer.
- :func:`eval_step`: counts correct predictions over the valid rows of a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.data.batching import Batch
from kdjax.losses import cross_entropy, soft_kl
from kdjax.losses.classification import masked_mean, mix_hard_soft
from kdjax.train.state import FrozenModel, TrainState

Metrics = dict[str, jax.Array]
# A loss function maps the student's logits to (loss, metrics to log).
LogitsLoss = Callable[[jax.Array], tuple[jax.Array, Metrics]]


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def _apply_loss(
    state: TrainState, batch: Batch, logits_loss: LogitsLoss
) -> tuple[TrainState, Metrics]:
    """One optimizer update of ``state`` on ``logits_loss`` of its training-mode forward pass."""
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
        (logits, _), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss, metrics = logits_loss(logits)
        metrics["accuracy"] = _accuracy(logits, batch["label"], batch["mask"])
        return loss, (updates.get("batch_stats", state.batch_stats), metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """Minimises the hard-label cross-entropy."""

    def logits_loss(logits: jax.Array) -> tuple[jax.Array, Metrics]:
        loss = cross_entropy(logits, batch["label"], batch["mask"])
        return loss, {"loss": loss}

    return _apply_loss(state, batch, logits_loss)


@functools.partial(jax.jit, donate_argnums=0)
def distill_step(
    state: TrainState,
    batch: Batch,
    teacher: FrozenModel,
    temperature: jax.Array,
    alpha: jax.Array,
) -> tuple[TrainState, Metrics]:
    """Minimises ``(1 - alpha) * cross_entropy + alpha * soft_kl(T)`` against ``teacher``.

    ``temperature`` and ``alpha`` are traced, so changing them does not recompile.
    """
    teacher_logits = jax.lax.stop_gradient(teacher(batch["image"])[0])

    def logits_loss(logits: jax.Array) -> tuple[jax.Array, Metrics]:
        hard = cross_entropy(logits, batch["label"], batch["mask"])
        soft = soft_kl(logits, teacher_logits, temperature, batch["mask"])
        loss = mix_hard_soft(hard, soft, alpha)
        agreement = masked_mean(
            (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32),
            batch["mask"],
        )
        return loss, {
            "loss": loss,
            "hard_ce": hard,
            "soft_kl": soft,
            "teacher_agreement": agreement,
        }

    return _apply_loss(state, batch, logits_loss)


@jax.jit
def eval_step(model: FrozenModel, batch: Batch) -> Metrics:
    """Sums over the valid rows: correct predictions, examples, and cross-entropy."""
    logits, _ = model(batch["image"])
    valid = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]) & valid
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(log_probs, batch["label"][:, None], -1)[:, 0]
    return {
        "correct": jnp.sum(correct),
        "count": jnp.sum(valid),
        "loss_sum": jnp.sum(jnp.where(valid, nll, 0.0)),
    }
