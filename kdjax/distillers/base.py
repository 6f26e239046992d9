"""What every distiller is: a frozen dataclass of hyperparameters with a pure ``terms`` method.

A distiller maps the student's and teacher's outputs on one batch to a dict of *unweighted*
loss terms. It may own trainable parameters (a FitNets regressor, CRD's embedding heads), kept
beside the student's and updated by the same optimizer, and non-trainable buffers (CRD's
memory bank), carried in the train state and checkpointed with it. It never sees the config's
loss weights: :func:`combine_terms` applies them, in one place, for every method.

Adding a method: one file in this package with its pure loss and a registered subclass of
:class:`Distiller`, and one config naming it (``student.distiller.name``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.registry import Registry

Array = jax.Array
Terms = dict[str, Array]


class DistillInputs(NamedTuple):
    """One batch as a distiller sees it (everything already computed by the step).

    ``teacher_logits`` has a leading teacher axis, ``[teachers, batch, classes]``: one for a
    single teacher, K for an ensemble. ``teacher_features`` are the first teacher's.
    """

    student_logits: Array  # [batch, classes]
    student_features: Mapping[str, Array]
    teacher_logits: Array  # [teachers, batch, classes]
    teacher_features: Mapping[str, Array]
    labels: Array  # [batch] int
    mask: Array  # [batch] bool; false rows are padding
    index: Array  # [batch] int: each example's position in the training split


class TrainingSet(NamedTuple):
    """What a distiller may know about the training split when it is built (CRD's memory bank
    has one row per example and draws negatives from other classes)."""

    num_examples: int
    labels: np.ndarray  # [examples] int
    num_classes: int


@dataclasses.dataclass(frozen=True)
class Distiller:
    """Base class. Subclasses are frozen dataclasses whose fields are the method's
    hyperparameters (with the paper's values as defaults); they are static under ``jit``.

    Class attributes:
      term_names: the names of the terms :meth:`terms` returns; the config gives each a weight.
      default_weights: the paper's weights of those terms and of ``ce`` (the hard labels).
      default_warmup_epochs: epochs over which the teacher's terms ramp up from 0
        (:func:`warmup_ramp`); 0 for none.
      feature_based: reads ``teacher_features``; an ensemble of teachers has no single set of
        features, so feature-based methods take one teacher.
    """

    term_names: ClassVar[tuple[str, ...]] = ()
    default_weights: ClassVar[dict[str, float]] = {}
    default_warmup_epochs: ClassVar[float] = 0.0
    feature_based: ClassVar[bool] = False

    def init(
        self,
        key: Array,
        student_features: Mapping[str, Array],
        teacher_features: Mapping[str, Array],
        training_set: TrainingSet,
    ) -> tuple[Any, Any]:
        """(trainable parameters, buffers) of a fresh run; both ``{}`` unless overridden.

        ``student_features``/``teacher_features`` are those of a batch of examples, giving
        shapes (e.g. a regressor's input and output widths)."""
        del key, student_features, teacher_features, training_set
        return {}, {}

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        """(unweighted loss terms, updated buffers) of one batch."""
        raise NotImplementedError


DISTILLERS: Registry[type[Distiller]] = Registry("distiller")


def combine_terms(terms: Terms, weights: Mapping[str, Array], ramp: Array) -> tuple[Array, Terms]:
    """The one place loss weights are applied: ``loss = sum_k w_k * r_k * term_k``, where
    ``r_k = ramp`` for every teacher term and 1 for ``ce`` (the hard labels), so a warm-up
    (DKD's) grows the teacher's terms from 0 while the hard term trains at full weight.

    Returns the total and the weighted terms (``<name>_weighted``) for logging.
    """
    weighted = {}
    for name, value in terms.items():
        factor = weights[name] if name == "ce" else weights[name] * ramp
        weighted[f"{name}_weighted"] = factor * value
    total = sum(weighted.values(), jnp.zeros((), jnp.float32))
    return total, weighted


def warmup_ramp(step: Array, steps_per_epoch: int, warmup_epochs: float) -> Array:
    """``min((step + 1) / (warmup_epochs * steps_per_epoch), 1)``: a linear ramp over the first
    ``warmup_epochs`` epochs, raised every step (``step`` counted from 0); 1 without warm-up.

    mdistiller raises DKD's weight once per epoch, to ``epoch / 20``: the same line, sampled at
    each epoch's last step, where the two agree. Per step, a warm-up shorter than a few epochs
    (a short run's) still starts from almost 0 instead of jumping to full weight.
    """
    if warmup_epochs <= 0:
        return jnp.ones((), jnp.float32)
    steps = jnp.float32(warmup_epochs * steps_per_epoch)
    return jnp.minimum((step.astype(jnp.float32) + 1.0) / steps, 1.0)
