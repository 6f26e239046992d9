"""Fully connected nets: Hinton et al.'s 784-1200-1200-10 teacher and 784-800-800-10 student."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from kdjax.models.factory import MODELS, check_rate, check_widths


@MODELS.register("mlp")
class MLP(nn.Module):
    """ReLU MLP on flattened inputs.

    Features: ``hidden{i}`` (after ReLU, before dropout) for each hidden layer; ``pre_logits``
    is the last hidden layer (the input itself if there are none).
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (800, 800)
    dropout_rate: float = 0.0  # on each hidden layer, during training only
    input_dropout_rate: float = 0.0  # on the input pixels, during training only

    def __post_init__(self) -> None:
        check_widths("hidden_sizes", self.hidden_sizes, allow_empty=True)
        check_rate("dropout_rate", self.dropout_rate)
        check_rate("input_dropout_rate", self.input_dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
        features = {}
        for i, width in enumerate(self.hidden_sizes, start=1):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
            features[f"hidden{i}"] = x
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        features["pre_logits"] = features.get(f"hidden{len(self.hidden_sizes)}", x)
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features
