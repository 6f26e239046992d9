"""A small convolutional net for 28x28 (and 8x8) greyscale images."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from kdjax.models.factory import MODELS, check_rate, check_widths
from kdjax.models.norm import BatchNorm


@MODELS.register("cnn")
class SmallCNN(nn.Module):
    """Conv(3x3) [+ BatchNorm] + ReLU + 2x2 max-pool per stage, then one hidden dense layer.

    Features: ``stage{i}`` (after each stage's ReLU, before pooling) and ``pre_logits``.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64)
    dense_size: int = 128
    batch_norm: bool = True
    dropout_rate: float = 0.0  # before the classifier, during training only

    def __post_init__(self) -> None:
        check_widths("channels", self.channels, allow_empty=False)
        check_widths("dense_size", (self.dense_size,), allow_empty=False)
        check_rate("dropout_rate", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        if x.ndim != 4:
            raise ValueError(f"cnn expects images [batch, height, width, channels], got {x.shape}")
        features = {}
        for i, width in enumerate(self.channels, start=1):
            x = nn.Conv(
                width, (3, 3), padding="SAME", use_bias=not self.batch_norm, name=f"conv{i}"
            )(x)
            if self.batch_norm:
                x = BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
            features[f"stage{i}"] = x
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            if 0 in x.shape[1:3]:
                raise ValueError(
                    f"its {len(self.channels)} stages of 2x2 pooling leave nothing of these "
                    f"images after stage {i}: use at most {i - 1} channels entries"
                )
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense_size, name="dense")(x))
        features["pre_logits"] = x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features
