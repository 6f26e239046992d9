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
from kdjax.models.norm import batch_statistics
from kdjax.train.precision import for_compute
from kdjax.train.state import FrozenModel, TrainState

Metrics = dict[str, jax.Array]
_JITTER_STREAM = 1  # folded into a step's dropout key to give its jitter key
# A loss function maps the student's logits to (loss, metrics to log).
LogitsLoss = Callable[[jax.Array], tuple[jax.Array, Metrics]]


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def _step_keys(state: TrainState, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(dropout key, jitter key) of this step: a pure function of the run's key and step.

    The dropout key is ``fold_in(rng, step)`` whether or not the images are jittered, so adding
    jitter to a config leaves its dropout masks as they were. Under sharded jit the keys draw
    the global batch's randomness, the same on any number of devices; under ``pmap``
    (``axis_name``) each device holds only its slice, so the device index is folded in to give
    each slice its own draws (these differ from a one-device run's).
    """
    dropout_key = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    return dropout_key, jax.random.fold_in(dropout_key, _JITTER_STREAM)


def forward_train(
    state: TrainState,
    params: Any,
    images: jax.Array,
    mask: jax.Array,
    dropout_key: jax.Array,
    axis_name: str | None = None,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
    """The student's training-mode forward pass: ``((logits, features), new batch_stats)``.

    Batch-norm statistics are over the batch's valid rows (``mask``), and over every device of
    ``axis_name`` under ``pmap`` (:mod:`kdjax.models.norm`). The arithmetic is
    ``state.precision``'s (:mod:`kdjax.train.precision`).
    """
    params, images = for_compute(params, images, state.precision)
    with batch_statistics(mask=mask, axis_name=axis_name):
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
    return outputs, updates.get("batch_stats", state.batch_stats)


# CIFAR's crop-and-flip: (pad, per-channel fill of the padding), static; None for none.
CropFlip = tuple[int, tuple[float, ...]] | None


def augment_options(stage: Any, padding_value: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The static augmentation arguments of a stage config: ``max_shift`` (jitter, pixels) and,
    for ``crop_flip_pad > 0``, ``crop_flip`` with the dataset's ``padding_value`` (a black
    pixel after its normalisation) as the fill. Only the augmentations that are on are named,
    so a step without augmentation arguments (the cached-teacher one) takes the result too."""
    pad = int(stage.get("crop_flip_pad", 0))
    shift = int(stage.get("max_shift", 0))
    fill = tuple(float(v) for v in padding_value) if padding_value is not None else (0.0,)
    return ({"max_shift": shift} if shift else {}) | ({"crop_flip": (pad, fill)} if pad else {})


def _training_images(
    state: TrainState,
    batch: Batch,
    max_shift: int,
    crop_flip: CropFlip = None,
    axis_name: str | None = None,
) -> jax.Array:
    jitter_key = _step_keys(state, axis_name)[1]
    images = random_translate(batch["image"], jitter_key, max_shift)
    if crop_flip is not None:
        pad, fill = crop_flip
        images = random_crop_flip(images, jitter_key, pad=pad, fill=fill)
    return images


def _apply_loss(
    state: TrainState,
    images: jax.Array,
    batch: Batch,
    logits_loss: LogitsLoss,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update of ``state`` on ``logits_loss`` of its training-mode forward pass.

    Under ``pmap`` (``axis_name``) each device's loss and metrics are masked means over its own
    rows; each is weighted by the device's share of the global batch's valid rows and then
    summed over devices (``psum``), gradients too. That is ``sum / count`` over the global
    batch, never a mean of per-device means, so padding on some devices changes nothing.
    """
    dropout_key, _ = _step_keys(state, axis_name)
    share = _global_share(batch["mask"], axis_name)

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
        (logits, _), batch_stats = forward_train(
            state, params, images, batch["mask"], dropout_key, axis_name
        )
        loss, metrics = logits_loss(logits)
        metrics["accuracy"] = _accuracy(logits, batch["label"], batch["mask"])
        metrics = {name: value * share for name, value in metrics.items()}
        return loss * share, (batch_stats, metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads, metrics = jax.lax.psum((grads, metrics), axis_name)
    return guarded_update(state, grads, metrics, batch_stats=batch_stats)


def _global_share(mask: jax.Array, axis_name: str | None) -> jax.Array:
    """This device's fraction of the global batch's valid rows (1 without a mapped axis)."""
    if axis_name is None:
        return jnp.float32(1.0)
    local = jnp.sum(mask.astype(jnp.float32))
    return local / jnp.maximum(jax.lax.psum(local, axis_name), 1.0)


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


_STATIC = ("max_shift", "crop_flip", "axis_name")


@functools.partial(jax.jit, donate_argnums=0, static_argnames=_STATIC)
def train_step(
    state: TrainState,
    batch: Batch,
    *,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """Minimises the hard-label cross-entropy. ``axis_name``: the mapped device axis when the
    step runs under ``jax.pmap`` (:mod:`kdjax.train.parallel`); None otherwise."""

    def logits_loss(logits: jax.Array) -> tuple[jax.Array, Metrics]:
        loss = cross_entropy(logits, batch["label"], batch["mask"])
        return loss, {"loss": loss}

    images = _training_images(state, batch, max_shift, crop_flip, axis_name)
    return _apply_loss(state, images, batch, logits_loss, axis_name)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=_STATIC)
def distill_step(
    state: TrainState,
    batch: Batch,
    teacher: FrozenModel,
    temperature: jax.Array,
    alpha: jax.Array,
    *,
    max_shift: int = 0,
    crop_flip: CropFlip = None,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """Minimises ``(1 - alpha) * cross_entropy + alpha * soft_kl(T)`` against ``teacher``.

    ``temperature`` and ``alpha`` are traced, so changing them does not recompile. With
    ``max_shift`` or ``crop_flip`` the teacher sees the same augmented images as the student.
    """
    images = _training_images(state, batch, max_shift, crop_flip, axis_name)
    teacher_logits = teacher(images)[0]
    return _distill(state, images, batch, teacher_logits, temperature, alpha, axis_name)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="axis_name")
def distill_from_logits_step(
    state: TrainState,
    batch: Batch,
    temperature: jax.Array,
    alpha: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """:func:`distill_step` with the teacher's logits given in ``batch["teacher_logits"]``."""
    return _distill(
        state, batch["image"], batch, batch["teacher_logits"], temperature, alpha, axis_name
    )


def _distill(
    state: TrainState,
    images: jax.Array,
    batch: Batch,
    teacher_logits: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
    axis_name: str | None,
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

    return _apply_loss(state, images, batch, logits_loss, axis_name)


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
