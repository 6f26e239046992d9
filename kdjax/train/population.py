"""Populations: several members (seeds, or seeds x temperatures) trained in one compiled program.

A population is an ordinary :class:`TrainState` (or :class:`FrozenModel`) whose every array has
a leading *member* axis. Its steps are the single-model steps of :mod:`kdjax.train.steps`
under ``jax.vmap``, so member ``m`` follows exactly the arithmetic of a lone run: same
initialisation (from ``keys[m]``), same dropout and jitter keys, same batches (from
``seeds[m]``), same per-member hyperparameters (``temperatures[m]``, ``alphas[m]``). One
compiled program runs every member: on an accelerator, S small models cost little more than
one; on a CPU that is already busy with one model's matmuls, the saving is the per-step
overhead (measured: 3 x 1200-1200 MLPs at 94 % of 3 x one model's examples/s on 2 cores).

Every function here works for any model and optimizer; nothing is specific to one experiment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.data.batching import Batch, DeviceSplit
from kdjax.train.loop import FitResult, fit
from kdjax.train.optim import make_optimizer
from kdjax.train.state import FrozenModel, TrainState, create_train_state
from kdjax.train.steps import (
    CropFlip,
    Metrics,
    distill_from_logits_step,
    distill_step,
    train_step,
)

Tree = TypeVar("Tree")


def member_keys(seeds: Sequence[int]) -> jax.Array:
    """One key per member: ``jax.random.key(seed)``, as a lone run of that seed would use."""
    return jnp.stack([jax.random.key(int(s)) for s in seeds])


def init_population(
    model: nn.Module,
    tx: optax.GradientTransformation,
    keys: jax.Array,
    example_images: np.ndarray,
) -> TrainState:
    """A population of ``len(keys)`` fresh train states; member ``m`` is initialised exactly as
    :func:`init_member` would initialise it from ``keys[m]``."""
    return jax.jit(jax.vmap(functools.partial(_init_one, model, tx, example_images)))(keys)


def init_member(
    model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, example_images: np.ndarray
) -> TrainState:
    """One fresh train state from ``key``: the lone-run counterpart of :func:`init_population`."""
    return jax.jit(functools.partial(_init_one, model, tx, example_images))(key)


def _init_one(
    model: nn.Module, tx: optax.GradientTransformation, example_images: np.ndarray, key: jax.Array
) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    variables = model.init(init_key, jnp.asarray(example_images[:1]), train=False)
    return create_train_state(model, dict(variables), tx, dropout_key)


def member(tree: Tree, index: int) -> Tree:
    """Member ``index`` of a population (any pytree with a leading member axis)."""
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def stack_members(trees: Sequence[Tree]) -> Tree:
    """The population whose members are ``trees`` (same structure and shapes)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def select_members(tree: Tree, index: Sequence[int]) -> Tree:
    """A population of the given members, in that order (repeats allowed): e.g. one teacher
    per student of a temperature sweep."""
    index = np.asarray(index, dtype=np.int32)
    return jax.tree_util.tree_map(lambda x: x[index], tree)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("max_shift", "crop_flip"))
def population_train_step(
    states: TrainState, batches: Batch, *, max_shift: int = 0, crop_flip: CropFlip = None
) -> tuple[TrainState, Metrics]:
    """:func:`~kdjax.train.steps.train_step` for every member at once."""
    step = functools.partial(train_step, max_shift=max_shift, crop_flip=crop_flip)
    return jax.vmap(step)(states, batches)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("max_shift", "crop_flip"))
def population_distill_step(
    states: TrainState,
    batches: Batch,
    teachers: FrozenModel,
    temperatures: jax.Array,
    alphas: jax.Array,
    *,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
) -> tuple[TrainState, Metrics]:
    """:func:`~kdjax.train.steps.distill_step`, each member against its own teacher (a
    population of the same length) with its own temperature and alpha (``[members]``)."""
    step = functools.partial(distill_step, max_shift=max_shift, crop_flip=crop_flip)
    return jax.vmap(step)(states, batches, teachers, temperatures, alphas)


@functools.partial(jax.jit, donate_argnums=0)
def population_distill_from_logits_step(
    states: TrainState, batches: Batch, temperatures: jax.Array, alphas: jax.Array
) -> tuple[TrainState, Metrics]:
    """:func:`~kdjax.train.steps.distill_from_logits_step` for every member at once."""
    return jax.vmap(distill_from_logits_step)(states, batches, temperatures, alphas)


MEMBER_LOOPS = ("vmap", "unroll", "map")


@functools.partial(jax.jit, donate_argnums=0, static_argnames="loop")
def shared_teacher_distill_step(
    states: TrainState,
    batch: Batch,
    teacher: FrozenModel,
    temperatures: jax.Array,
    alphas: jax.Array,
    *,
    loop: str = "vmap",
) -> tuple[TrainState, Metrics]:
    """Every member distilled on the *same* ``batch`` (no member axis) from *one* teacher pass.

    :func:`population_distill_step` gives each member its own batch order and its own teacher,
    so it runs the teacher once per member; students that share a teacher and a batch (a
    temperature or alpha sweep, several seeds of one student) need it once. Member ``m`` gets
    exactly :func:`~kdjax.train.steps.distill_step` of ``states[m]`` with ``temperatures[m]``
    and ``alphas[m]``. Unaugmented only: augmented members would each need their own view, and
    so their own teacher pass.

    ``loop`` (static): how the members' updates run inside the one compiled step. ``vmap``
    batches them (matmuls become batched matmuls, convolutions grouped ones): best where
    grouped convolutions are fast (GPU, TPU) and for MLPs. ``unroll`` writes one update per
    member into the program, one after another: CNN members on a CPU, where XLA's grouped
    convolutions are slow (compile time grows with the member count). ``map`` runs them
    through ``lax.map`` (one compiled body): the smallest program, but on XLA's CPU backend
    convolutions inside its loop run many times slower than the same ones outside it.
    """
    teacher_logits = teacher(batch["image"])[0]
    with_logits = Batch(**batch, teacher_logits=teacher_logits)
    if loop == "vmap":
        step = jax.vmap(distill_from_logits_step, in_axes=(0, None, 0, 0))
        return step(states, with_logits, temperatures, alphas)
    if loop == "unroll":
        members = [
            distill_from_logits_step(
                jax.tree_util.tree_map(lambda x, m=m: x[m], states),
                with_logits,
                temperatures[m],
                alphas[m],
            )
            for m in range(temperatures.shape[0])
        ]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    if loop != "map":
        raise ValueError(f"loop={loop!r} must be one of {', '.join(MEMBER_LOOPS)}")

    def one(member: tuple[TrainState, jax.Array, jax.Array]) -> tuple[TrainState, Metrics]:
        state, temperature, alpha = member
        return distill_from_logits_step(state, with_logits, temperature, alpha)

    return jax.lax.map(one, (states, temperatures, alphas))


@functools.partial(jax.jit, static_argnames="members")
def _logits(model: FrozenModel, images: jax.Array, members: bool) -> jax.Array:
    def apply(variables: Any) -> jax.Array:
        return model.apply_fn(variables, images, train=False)[0].astype(jnp.float32)

    return jax.vmap(apply)(model.variables) if members else apply(model.variables)


def predict_logits(
    model: FrozenModel, split: DeviceSplit, batch_size: int, *, members: bool
) -> np.ndarray:
    """Inference-mode logits of every example of ``split``, in order, as a host array:
    ``[examples, classes]``, or ``[members, examples, classes]`` for a population."""
    chunks = []
    for batch in split.eval_batches(batch_size):
        logits = _logits(model, batch["image"], members)
        valid = int(jnp.sum(batch["mask"]))
        chunks.append(np.asarray(logits)[..., :valid, :])
    return np.concatenate(chunks, axis=-2)


def fit_population(
    model: nn.Module,
    stage: Any,
    split: DeviceSplit,
    seeds: Sequence[int],
    keys: jax.Array,
    step_fn: Any,
    *,
    name: str,
    field: str,
    **fit_options: Any,
) -> FitResult:
    """Trains ``len(seeds)`` members of ``model`` together, as a ``stage_config`` says.

    Member ``m`` starts from ``keys[m]`` and sees the batches of ``seeds[m]``; ``step_fn`` is a
    population step (``population_train_step`` or a distill step with its extra arguments bound).
    ``fit_options`` go to :func:`~kdjax.train.loop.fit` (callbacks, checkpoints, on_nonfinite).
    """
    total_steps = split.steps_per_epoch(stage["batch_size"]) * stage["epochs"]
    tx = make_optimizer(
        stage["optimizer"],
        total_steps=total_steps,
        field=f"{field}.optimizer",
        steps_per_epoch=split.steps_per_epoch(stage["batch_size"]),
    )
    states = init_population(model, tx, keys, split_example(split))
    return fit(
        states,
        split,
        step_fn,
        epochs=stage["epochs"],
        batch_size=stage["batch_size"],
        seed=list(seeds),
        name=name,
        **fit_options,
    )


def split_example(split: DeviceSplit) -> np.ndarray:
    """One example image of ``split`` (its shape is all ``model.init`` needs)."""
    return np.asarray(split.images[:1])
