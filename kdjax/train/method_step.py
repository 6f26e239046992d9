"""The distillation step for any registered distiller (:mod:`kdjax.distillers`), for one
student or a population of them.

:class:`DistillState` is a :class:`~kdjax.train.state.TrainState` whose ``params`` are
``{"student": ..., "distiller": ...}`` (a FitNets regressor or CRD's embedding heads train with
the student, under the same optimizer) and whose ``buffers`` hold the distiller's non-trainable
state (CRD's memory bank), checkpointed with the rest. Its :meth:`~DistillState.frozen` model
is the student alone: the distiller's parameters are discarded after training.

The teachers are a tuple of :class:`~kdjax.train.state.FrozenModel` (one, or an ensemble of K),
all applied in inference mode inside the same compiled step on the student's augmented view.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.data.batching import Batch
from kdjax.distillers import Distiller, DistillInputs, TrainingSet, combine_terms, warmup_ramp
from kdjax.losses import cross_entropy
from kdjax.losses.classification import masked_mean
from kdjax.train.state import FrozenModel, TrainState
from kdjax.train.steps import (
    CropFlip,
    Metrics,
    _step_keys,
    _training_images,
    forward_train,
    guarded_update,
)

_DISTILLER_STREAM = 2  # folded into a step's dropout key to give the distiller's key (CRD)
_DISTILLER_INIT_STREAM = 3  # folded into a member's key to initialise the distiller's parameters

Teachers = tuple[FrozenModel, ...]


class DistillState(TrainState):
    """A student, its distiller's parameters (in ``params``) and buffers."""

    buffers: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The *student's* variables, as its ``model.init`` made them."""
        if not self.batch_stats:
            return {"params": self.params["student"]}
        return {"params": self.params["student"], "batch_stats": self.batch_stats}


def init_distill_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    example_images: np.ndarray,
    teacher: FrozenModel,
    distiller: Distiller,
    training_set: TrainingSet,
) -> DistillState:
    """A fresh state from ``key``. The student is initialised exactly as a student trained
    from scratch from the same key (:func:`kdjax.train.population.init_member`), so a method's
    student and the scratch student start from the same weights."""
    init_key, dropout_key = jax.random.split(key)
    images = jnp.asarray(example_images[:2])
    variables = dict(model.init(init_key, images[:1], train=False))
    student_features = model.apply(variables, images, train=False)[1]
    teacher_features = teacher(images)[1]
    distiller_params, buffers = distiller.init(
        jax.random.fold_in(key, _DISTILLER_INIT_STREAM),
        student_features,
        teacher_features,
        training_set,
    )
    state = DistillState.create(
        apply_fn=model.apply,
        params={"student": variables["params"], "distiller": distiller_params},
        batch_stats=variables.get("batch_stats", {}),
        buffers=buffers,
        tx=tx,
        rng=dropout_key,
    )
    return state.replace(step=jnp.zeros((), jnp.int32))


def _teacher_outputs(teachers: Teachers, images: jax.Array) -> tuple[jax.Array, Any]:
    """``([K, batch, classes]`` logits, the first teacher's features), gradient-free."""
    outputs = [teacher(images) for teacher in teachers]
    logits = jnp.stack([logits for logits, _ in outputs])
    return jax.lax.stop_gradient((logits, outputs[0][1]))


def _distill_with(
    state: DistillState,
    batch: Batch,
    teachers: Teachers,
    weights: dict[str, jax.Array],
    distiller: Distiller,
    warmup_epochs: float,
    steps_per_epoch: int,
    max_shift: int,
    crop_flip: CropFlip,
) -> tuple[DistillState, Metrics]:
    images = _training_images(state, batch, max_shift, crop_flip)
    teacher_logits, teacher_features = _teacher_outputs(teachers, images)
    dropout_key, _ = _step_keys(state)
    distiller_key = jax.random.fold_in(dropout_key, _DISTILLER_STREAM)
    ramp = warmup_ramp(state.step, steps_per_epoch, warmup_epochs)
    index = batch.get("index", jnp.arange(batch["label"].shape[0], dtype=jnp.int32))

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, Any, Metrics]]:
        (logits, features), batch_stats = forward_train(
            state, params["student"], images, batch["mask"], dropout_key
        )
        inputs = DistillInputs(
            logits, features, teacher_logits, teacher_features, batch["label"], batch["mask"], index
        )
        terms, buffers = distiller.terms(params["distiller"], state.buffers, inputs, distiller_key)
        terms = {"ce": cross_entropy(logits, batch["label"], batch["mask"]), **terms}
        loss, weighted = combine_terms(terms, weights, ramp)
        # The ensemble's prediction is its averaged probabilities' argmax (that of the mean
        # log-probabilities would differ).
        teacher_top1 = jnp.argmax(jnp.mean(jax.nn.softmax(teacher_logits, -1), 0), -1)
        metrics = {
            "loss": loss,
            **terms,
            **weighted,
            "accuracy": masked_mean(
                (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), batch["mask"]
            ),
            "teacher_agreement": masked_mean(
                (jnp.argmax(logits, -1) == teacher_top1).astype(jnp.float32), batch["mask"]
            ),
        }
        return loss, (batch_stats, buffers, metrics)

    grads, (batch_stats, buffers, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    # A skipped (non-finite) step leaves the buffers as they were too.
    return guarded_update(state, grads, metrics, batch_stats=batch_stats, buffers=buffers)


_STATIC = ("distiller", "warmup_epochs", "steps_per_epoch", "max_shift", "crop_flip")


@functools.partial(jax.jit, donate_argnums=0, static_argnames=_STATIC)
def method_distill_step(
    state: DistillState,
    batch: Batch,
    teachers: Teachers,
    weights: dict[str, jax.Array],
    *,
    distiller: Distiller,
    warmup_epochs: float = 0.0,
    steps_per_epoch: int = 1,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
) -> tuple[DistillState, Metrics]:
    """One update on ``sum_k weights[k] * term_k`` (:func:`~kdjax.distillers.combine_terms`):
    ``ce`` on the hard labels plus the distiller's terms, the latter ramped over
    ``warmup_epochs`` (epochs of ``steps_per_epoch`` steps). Logs every term raw and weighted.
    """
    return _distill_with(
        state,
        batch,
        teachers,
        weights,
        distiller,
        warmup_epochs,
        steps_per_epoch,
        max_shift,
        crop_flip,
    )


@functools.partial(jax.jit, donate_argnums=0, static_argnames=_STATIC)
def population_method_distill_step(
    states: DistillState,
    batches: Batch,
    teachers: Teachers,
    weights: dict[str, jax.Array],
    *,
    distiller: Distiller,
    warmup_epochs: float = 0.0,
    steps_per_epoch: int = 1,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
) -> tuple[DistillState, Metrics]:
    """:func:`method_distill_step` for every member at once; ``teachers`` carry the member axis
    (each student its own teachers), ``weights`` are shared."""
    step = functools.partial(
        _distill_with,
        distiller=distiller,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        max_shift=max_shift,
        crop_flip=crop_flip,
    )
    return jax.vmap(step, in_axes=(0, 0, 0, None))(states, batches, teachers, weights)
