"""Optax optimizers and learning-rate schedules, chosen by name in a stage's ``optimizer``
config section."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdjax.errors import ConfigError
from kdjax.registry import Registry

SCHEDULES: Registry[Callable[..., optax.Schedule]] = Registry("learning-rate schedule")
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")


# A schedule maker takes (peak, decaying steps, the optimizer config, steps per epoch).
@SCHEDULES.register("constant")
def _constant(peak: float, total_steps: int, cfg: Mapping[str, Any], steps_per_epoch: int | None):
    return optax.constant_schedule(peak)


@SCHEDULES.register("cosine")
def _cosine(peak: float, total_steps: int, cfg: Mapping[str, Any], steps_per_epoch: int | None):
    return optax.cosine_decay_schedule(peak, decay_steps=max(total_steps, 1))


@SCHEDULES.register("linear")
def _linear(peak: float, total_steps: int, cfg: Mapping[str, Any], steps_per_epoch: int | None):
    return optax.linear_schedule(peak, 0.0, transition_steps=max(total_steps, 1))


@SCHEDULES.register("multistep")
def _multistep(peak: float, total_steps: int, cfg: Mapping[str, Any], steps_per_epoch: int | None):
    """``peak`` times ``decay_factor`` at each epoch of ``decay_epochs`` (the CIFAR recipes'
    "divided by 10 at epochs 150, 180 and 210"); counted after any warm-up."""
    if steps_per_epoch is None:
        raise ConfigError("schedule=multistep needs epochs: this runner does not give them.")
    epochs = list(cfg.get("decay_epochs", ()))
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in epochs):
        raise ConfigError(f"decay_epochs={epochs} must be whole epochs >= 1.")
    factor = float(cfg.get("decay_factor", 0.1))
    return optax.piecewise_constant_schedule(peak, {e * steps_per_epoch: factor for e in epochs})


@OPTIMIZERS.register("sgd")
def _sgd(lr: optax.Schedule, cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    # Weight decay added to the gradient before momentum, as PyTorch's SGD (and the KD
    # literature's recipes) do.
    return optax.chain(
        optax.add_decayed_weights(cfg.get("weight_decay", 0.0)),
        optax.sgd(
            lr, momentum=cfg.get("momentum", 0.0) or None, nesterov=bool(cfg.get("nesterov", False))
        ),
    )


@OPTIMIZERS.register("adam")
def _adam(lr: optax.Schedule, cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(cfg.get("weight_decay", 0.0)), optax.adam(lr))


@OPTIMIZERS.register("adamw")
def _adamw(lr: optax.Schedule, cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=cfg.get("weight_decay", 0.0))


def max_norm_projection(max_norm: float) -> optax.GradientTransformation:
    """After the update, rescales each unit's incoming weights to an L2 norm of at most
    ``max_norm`` (Srivastava et al.'s max-norm constraint, which Hinton et al.'s dropout
    teacher used).

    Only kernels (leaves with two or more axes) are constrained; the norm runs over every axis
    but the last (the output units). It is written as a final optax stage that turns the
    update into ``project(params + update) - params``.
    """

    def project(kernel: jax.Array) -> jax.Array:
        if kernel.ndim < 2:
            return kernel
        axes = tuple(range(kernel.ndim - 1))
        norms = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes, keepdims=True))
        return kernel * jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("max_norm_projection needs the parameters: pass params to update.")
        new_params = optax.apply_updates(params, updates)
        projected = jax.tree_util.tree_map(project, new_params)
        return jax.tree_util.tree_map(jnp.subtract, projected, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    cfg: Mapping[str, Any],
    *,
    total_steps: int,
    field: str,
    steps_per_epoch: int | None = None,
) -> optax.GradientTransformation:
    """Builds ``cfg["name"]`` with a ``cfg["schedule"]`` learning rate peaking at
    ``cfg["learning_rate"]``, after ``cfg["warmup_steps"]`` steps of linear warm-up; a
    positive ``cfg["max_norm"]`` adds :func:`max_norm_projection`.

    ``schedule = "multistep"`` multiplies the rate by ``cfg["decay_factor"]`` at each epoch in
    ``cfg["decay_epochs"]`` (it needs ``steps_per_epoch``)."""
    schedule_fn = SCHEDULES.get(cfg.get("schedule", "constant"), field=f"{field}.schedule")
    optimizer_fn = OPTIMIZERS.get(cfg["name"], field=f"{field}.name")
    peak = float(cfg["learning_rate"])
    warmup = int(cfg.get("warmup_steps", 0))
    if warmup < 0:
        raise ConfigError(f"{field}.warmup_steps={warmup} must be >= 0.")
    try:
        lr = schedule_fn(peak, max(total_steps - warmup, 1), cfg, steps_per_epoch)
    except ConfigError as err:
        raise ConfigError(f"{field}.{err}") from err
    if warmup:
        lr = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), lr], [warmup])
    tx = optimizer_fn(lr, cfg)
    max_norm = float(cfg.get("max_norm", 0.0))
    return optax.chain(tx, max_norm_projection(max_norm)) if max_norm > 0 else tx
