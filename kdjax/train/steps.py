"""The jitted steps: each a module-level pure function, compiled once, the train state donated.

- :func:`train_step`: hard-label training (teacher fitting, students from scratch).
- :func:`distill_step`: Hinton KD; the teacher is a separate :class:`FrozenModel` applied in
  inference mode under ``stop_gradient`` and never seen by the optimizer.
- :func:`distill_from_logits_step`: the same update from teacher logits computed beforehand
  (``batch["teacher_logits"]``): an unaugmented transfer set needs the teacher only once.
- :func:`eval_step`: counts correct predictions over the valid rows of a batch.

Every training step logs the gradient's global norm and guards the update: a step whose loss or
gradient is not finite leaves the state as it was (only ``step`` advances) and reports
``nonfinite = 1``; the loop then stops or counts it (:mod:`kdjax.train.loop`).

``max_shift`` (static) jitters the training images by up to that many pixels, drawn from the
step's key; ``crop_flip`` (static ``(pad, fill)``) applies CIFAR's pad-crop-flip. All
training steps are vmapped unchanged into :mod:`kdjax.train.population`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdjax.data.augment import random_crop_flip, random_translate
from kdjax.data.batching import Batch
from kdjax.losses import cross_entropy, soft_kl
from kdjax.losses.classification import masked_mean, mix_hard_soft
from kdjax.train.state import FrozenModel, TrainState

Metrics = dict[str, jax.Array]
_JITTER_STREAM = 1  # folded into a step's dropout key to give its jitter key
# A loss function maps the student's logits to (loss, metrics to log).
LogitsLoss = Callable[[jax.Array], tuple[jax.Array, Metrics]]


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def _step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """(dropout key, jitter key) of this step: a pure function of the run's key and step.

    The dropout key is ``fold_in(rng, step)`` whether or not the images are jittered, so adding
    jitter to a config leaves its dropout masks as they were.
    """
    dropout_key = jax.random.fold_in(state.rng, state.step)
    return dropout_key, jax.random.fold_in(dropout_key, _JITTER_STREAM)


# CIFAR's crop-and-flip: (pad, per-channel fill of the padding), static; None for none.
CropFlip = tuple[int, tuple[float, ...]] | None


def augment_options(stage: Any, padding_value: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The static augmentation arguments of a stage config: ``max_shift`` (jitter, pixels) and,
    for ``crop_flip_pad > 0``, ``crop_flip`` with the dataset's ``padding_value`` (a black
    pixel after its normalisation) as the fill."""
    pad = int(stage.get("crop_flip_pad", 0))
    fill = tuple(float(v) for v in padding_value) if padding_value is not None else (0.0,)
    return {
        "max_shift": int(stage.get("max_shift", 0)),
        "crop_flip": (pad, fill) if pad > 0 else None,
    }


def _training_images(
    state: TrainState, batch: Batch, max_shift: int, crop_flip: CropFlip = None
) -> jax.Array:
    images = random_translate(batch["image"], _step_keys(state)[1], max_shift)
    if crop_flip is not None:
        pad, fill = crop_flip
        images = random_crop_flip(images, _step_keys(state)[1], pad=pad, fill=fill)
    return images


def _apply_loss(
    state: TrainState, images: jax.Array, batch: Batch, logits_loss: LogitsLoss
) -> tuple[TrainState, Metrics]:
    """One optimizer update of ``state`` on ``logits_loss`` of its training-mode forward pass."""
    dropout_key, _ = _step_keys(state)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
        (logits, _), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss, metrics = logits_loss(logits)
        metrics["accuracy"] = _accuracy(logits, batch["label"], batch["mask"])
        return loss, (updates.get("batch_stats", state.batch_stats), metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return guarded_update(state, grads, metrics, batch_stats=batch_stats)


def guarded_update(
    state: TrainState, grads: Any, metrics: Metrics, **replacements: Any
) -> tuple[TrainState, Metrics]:
    """Applies ``grads`` (and replaces the fields in ``replacements``, e.g. ``batch_stats``)
    unless the step's loss or gradient is not finite; adds ``grad_norm`` and ``nonfinite``.

    A step whose loss or gradient is NaN/Inf is not applied: the parameters, optimizer state
    and other fields stay as they were, only ``step`` advances. ``lax.cond`` (not a select over
    every array) keeps the usual update in place; under vmap it becomes a per-member select.
    ``nonfinite`` (0 or 1) tells the loop, which stops or counts.
    """
    metrics["grad_norm"] = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    state = jax.lax.cond(
        finite,
        lambda s: s.apply_gradients(grads=grads, **replacements),
        lambda s: s.replace(step=s.step + 1),
        state,
    )
    return state, metrics


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("max_shift", "crop_flip"))
def train_step(
    state: TrainState, batch: Batch, *, max_shift: int = 0, crop_flip: CropFlip = None
) -> tuple[TrainState, Metrics]:
    """Minimises the hard-label cross-entropy."""

    def logits_loss(logits: jax.Array) -> tuple[jax.Array, Metrics]:
        loss = cross_entropy(logits, batch["label"], batch["mask"])
        return loss, {"loss": loss}

    images = _training_images(state, batch, max_shift, crop_flip)
    return _apply_loss(state, images, batch, logits_loss)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("max_shift", "crop_flip"))
def distill_step(
    state: TrainState,
    batch: Batch,
    teacher: FrozenModel,
    temperature: jax.Array,
    alpha: jax.Array,
    *,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
) -> tuple[TrainState, Metrics]:
    """Minimises ``(1 - alpha) * cross_entropy + alpha * soft_kl(T)`` against ``teacher``.

    ``temperature`` and ``alpha`` are traced, so changing them does not recompile. With
    ``max_shift`` or ``crop_flip`` the teacher sees the same augmented images as the student.
    """
    images = _training_images(state, batch, max_shift, crop_flip)
    teacher_logits = teacher(images)[0]
    return _distill(state, images, batch, teacher_logits, temperature, alpha)


@functools.partial(jax.jit, donate_argnums=0)
def distill_from_logits_step(
    state: TrainState, batch: Batch, temperature: jax.Array, alpha: jax.Array
) -> tuple[TrainState, Metrics]:
    """:func:`distill_step` with the teacher's logits given in ``batch["teacher_logits"]``."""
    return _distill(state, batch["image"], batch, batch["teacher_logits"], temperature, alpha)


def _distill(
    state: TrainState,
    images: jax.Array,
    batch: Batch,
    teacher_logits: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
) -> tuple[TrainState, Metrics]:
    teacher_logits = jax.lax.stop_gradient(teacher_logits)

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

    return _apply_loss(state, images, batch, logits_loss)


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
