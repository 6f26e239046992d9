"""FitNets hints (Romero et al., 2015): a student stage, mapped by a learned regressor, regresses
onto a teacher stage.

``hint = mean_i mean_j (r(s_i)_j - t_i_j)^2`` over the valid examples ``i`` and every element
``j`` of the teacher's feature map (PyTorch's ``MSELoss`` per example, as RepDistiller uses).
The regressor ``r`` is trained with the student and discarded after training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.distillers.base import DISTILLERS, Distiller, DistillInputs, Terms, TrainingSet
from kdjax.distillers.features import flat, paired
from kdjax.losses.classification import masked_mean

Array = jax.Array


def hint_loss(regressed: Array, teacher_feature: Array, mask: Array | None = None) -> Array:
    """Mean squared error per example (over all feature elements), averaged over valid examples."""
    diff = flat(regressed) - flat(jax.lax.stop_gradient(teacher_feature)).astype(jnp.float32)
    return masked_mean(jnp.mean(diff**2, axis=-1), mask)


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher feature's shape.

    Feature maps ``[b, h, w, c]``: a 3x3 convolution (stride ``h_s / h_t`` when the student's map
    is larger, a stride-``h_t / h_s`` transposed convolution when it is smaller), then ReLU, as
    the teacher's stage outputs are post-ReLU. Vectors ``[b, d]``: a dense layer and ReLU.
    """

    teacher_shape: tuple[int, ...]  # one example's teacher feature shape

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        if len(self.teacher_shape) == 1:
            return nn.relu(nn.Dense(self.teacher_shape[0])(flat(x)))
        height, channels = self.teacher_shape[0], self.teacher_shape[-1]
        if x.shape[1] >= height:
            stride = x.shape[1] // height
            x = nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME")(x)
        else:
            stride = height // x.shape[1]
            x = nn.ConvTranspose(channels, (stride, stride), strides=(stride, stride))(x)
        if x.shape[1:] != tuple(self.teacher_shape):
            raise ValueError(
                f"the hint regressor maps {x.shape[1:]}, not the teacher's {self.teacher_shape}: "
                "pick a student stage whose spatial size is the teacher stage's times or divided "
                "by a whole number"
            )
        return nn.relu(x)


@DISTILLERS.register("fitnet")
@dataclasses.dataclass(frozen=True)
class FitNet(Distiller):
    """Term ``hint``: :func:`hint_loss` of ``regressor(student[student_feature])`` against
    ``teacher[teacher_feature]``. RepDistiller's weights: CE 1, hint 100 (its KD term off)."""

    student_feature: str = "stage2"
    teacher_feature: str = "stage2"

    term_names: ClassVar[tuple[str, ...]] = ("hint",)
    default_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "hint": 100.0}
    feature_based: ClassVar[bool] = True

    def _regressor(self, teacher_feature: Array) -> HintRegressor:
        return HintRegressor(teacher_shape=tuple(teacher_feature.shape[1:]))

    def init(
        self,
        key: Array,
        student_features: Mapping[str, Array],
        teacher_features: Mapping[str, Array],
        training_set: TrainingSet,
    ) -> tuple[Any, Any]:
        student, teacher = paired(student_features, teacher_features, self)
        variables = self._regressor(teacher).init(key, student)
        return {"regressor": variables["params"]}, {}

    def terms(
        self, params: Any, buffers: Any, inputs: DistillInputs, key: Array
    ) -> tuple[Terms, Any]:
        student, teacher = paired(inputs.student_features, inputs.teacher_features, self)
        regressed = self._regressor(teacher).apply({"params": params["regressor"]}, student)
        return {"hint": hint_loss(regressed, teacher, inputs.mask)}, buffers
