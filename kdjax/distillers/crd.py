"""Contrastive representation distillation (Tian et al., 2020), with the paper's memory bank.

Student and teacher embeddings (``pre_logits``) are projected by learned linear heads to
``embed_dim`` and L2-normalised: ``v_s``, ``v_t``. A *memory bank* holds one row per training
example (indexed by its position in the split) for each side, updated after every step with
momentum: ``m_i <- normalize(momentum * m_i + (1 - momentum) * v_i)``. For each example ``i``,
``negatives`` indices are drawn from examples of *other classes* (the paper's default "exact"
sampling). With ``h(v, m) = exp(<v, m> / tau) / Z`` (``Z`` fixed on the first step as the mean
of ``exp(<v, m> / tau)`` times the number of examples, as the reference code does), ``N`` the
number of examples and ``K`` the negatives, the NCE loss of one anchor is

``-log(h_pos / (h_pos + K/N)) - sum_neg log((K/N) / (h_neg + K/N))``,

taken twice (student anchor against the teacher's memory, and teacher anchor against the
student's), averaged over the batch: ``crd = nce_student + nce_teacher``. CRD-paper weights:
CE 1, CRD 0.8, KD 0 (the ``crd`` row of its table).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms, TrainingSet
from kdjax.distillers.features import flat, l2_normalize, paired
from kdjax.losses.classification import masked_mean

Array = jax.Array
_EPS = 1e-7


def nce_loss(scores: Array, num_examples: int, mask: Array | None = None) -> Array:
    """The NCE loss above for ``scores`` ``[batch, 1 + K]``: column 0 the positive ``h``, the
    others the negatives' (already divided by ``Z``)."""
    negatives = scores.shape[1] - 1
    noise = negatives / num_examples  # K * P_noise, P_noise = 1 / N
    log_positive = jnp.log(scores[:, 0] / (scores[:, 0] + noise + _EPS))
    log_negatives = jnp.log(noise / (scores[:, 1:] + noise + _EPS))
    return masked_mean(-(log_positive + jnp.sum(log_negatives, axis=1)), mask)


def sample_other_class(
    key: Array, labels: Array, count: int, by_class: Mapping[str, Array]
) -> Array:
    """``[batch, count]`` example indices, uniformly from the examples whose class differs from
    each row's label (with replacement). ``by_class`` holds the split's indices sorted by class
    (``order``) and each class's ``start`` and ``size`` in that order."""
    start = by_class["start"][labels][:, None]
    size = by_class["size"][labels][:, None]
    num_examples = by_class["order"].shape[0]
    # A uniform position among the N - size_y others, skipping class y's block of the order.
    u = jax.random.randint(key, (labels.shape[0], count), 0, num_examples - size)
    return by_class["order"][jnp.where(u < start, u, u + size)]


class _Embed(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return l2_normalize(nn.Dense(self.dim)(flat(x).astype(jnp.float32)))


@DISTILLERS.register("crd")
@dataclasses.dataclass(frozen=True)
class CRD(Distiller):
    """Term ``crd``. Trainable: the two embedding heads. Buffers: both memory banks, the
    normalising constants ``Z`` (negative until fixed by the first step) and the class index."""

    student_feature: str = "pre_logits"
    teacher_feature: str = "pre_logits"
    embed_dim: int = 128
    negatives: int = 16384  # K
    nce_temperature: float = 0.07  # tau
    momentum: float = 0.5

    term_names: ClassVar[tuple[str, ...]] = ("crd",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "crd": 0.8}
    feature_based: ClassVar[bool] = True

    def init(
        self,
        key: Array,
        student_features: Mapping[str, Array],
        teacher_features: Mapping[str, Array],
        training_set: TrainingSet,
    ) -> tuple[Any, Any]:
        student, teacher = paired(student_features, teacher_features, self)
        keys = jax.random.split(key, 4)
        head = _Embed(self.embed_dim)
        params = {
            "embed_student": head.init(keys[0], student)["params"],
            "embed_teacher": head.init(keys[1], teacher)["params"],
        }
        rows = (training_set.num_examples, self.embed_dim)
        bound = 1.0 / math.sqrt(self.embed_dim / 3)  # the reference code's uniform init
        labels = np.asarray(training_set.labels)
        sizes = np.bincount(labels, minlength=training_set.num_classes)
        if np.any(sizes == training_set.num_examples):
            raise ValueError("CRD draws negatives from other classes: the training set has one")
        buffers = {
            "memory_student": jax.random.uniform(keys[2], rows, jnp.float32, -bound, bound),
            "memory_teacher": jax.random.uniform(keys[3], rows, jnp.float32, -bound, bound),
            "z_student": -jnp.ones((), jnp.float32),
            "z_teacher": -jnp.ones((), jnp.float32),
            "by_class": {
                "order": jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
                "start": jnp.asarray(np.cumsum(sizes) - sizes, jnp.int32),
                "size": jnp.asarray(sizes, jnp.int32),
            },
        }
        return params, buffers

    def _scores(
        self, anchor: Array, memory: Array, index: Array, z: Array, n: int, mask: Array
    ) -> tuple[Array, Array]:
        """(scores / Z, Z): ``exp(<anchor, memory[index]> / tau)``, index ``[batch, 1 + K]``."""
        rows = jax.lax.stop_gradient(memory[index])
        scores = jnp.exp(jnp.einsum("bkd,bd->bk", rows, anchor) / self.nce_temperature)
        # Z from the valid rows only (all rows if there are none), so padding cannot skew it.
        valid = jnp.where(jnp.any(mask), mask, True).astype(scores.dtype)
        mean = jnp.sum(scores * valid[:, None]) / (jnp.sum(valid) * scores.shape[1])
        z = jnp.where(z < 0, jax.lax.stop_gradient(mean) * n, z)
        return scores / z, z

    def _update(self, memory: Array, index: Array, new: Array, mask: Array) -> Array:
        mixed = l2_normalize(memory[index] * self.momentum + new * (1.0 - self.momentum))
        # Padding rows write nothing: their index (out of range) is dropped. Writing back their
        # old row instead could overwrite a valid row's update that shares the index.
        index = jnp.where(mask, index, memory.shape[0])
        return memory.at[index].set(jax.lax.stop_gradient(mixed), mode="drop")

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        head = _Embed(self.embed_dim)
        student, teacher = paired(inputs.student_features, inputs.teacher_features, self)
        v_s = head.apply({"params": params["embed_student"]}, student)
        v_t = head.apply({"params": params["embed_teacher"]}, jax.lax.stop_gradient(teacher))
        n = buffers["memory_student"].shape[0]
        negatives = sample_other_class(key, inputs.labels, self.negatives, buffers["by_class"])
        index = jnp.concatenate([inputs.index[:, None], negatives], axis=1)
        # The student's anchor is scored against the teacher's memory, and the other way round.
        mask = inputs.mask.astype(bool)
        scores_s, z_t = self._scores(
            v_s, buffers["memory_teacher"], index, buffers["z_teacher"], n, mask
        )
        scores_t, z_s = self._scores(
            v_t, buffers["memory_student"], index, buffers["z_student"], n, mask
        )
        loss = nce_loss(scores_s, n, inputs.mask) + nce_loss(scores_t, n, inputs.mask)
        buffers = {
            **buffers,
            "memory_student": self._update(buffers["memory_student"], inputs.index, v_s, mask),
            "memory_teacher": self._update(buffers["memory_teacher"], inputs.index, v_t, mask),
            "z_student": z_s,
            "z_teacher": z_t,
        }
        return {"crd": loss}, buffers
