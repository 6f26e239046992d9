"""Builds a registered model from a config entry such as ``{"name": "mlp", ...}``."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import ConfigError
from kdjax.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")

# Fields every model has that come from the data, not from the user's model config.
_DATA_FIELDS = ("num_classes",)


def _hashable(value: Any) -> Any:
    # Modules are hashed when jitted as static arguments; config lists must become tuples.
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


def check_widths(name: str, widths: Any, *, allow_empty: bool) -> None:
    """Layer widths must be whole numbers >= 1 (ValueError, turned into a ConfigError)."""
    widths = tuple(widths) if isinstance(widths, list | tuple) else (widths,)
    if not widths and not allow_empty:
        raise ValueError(f"{name} must list at least one width")
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{name}={widths} must hold whole numbers >= 1")


def check_rate(name: str, rate: Any) -> None:
    """A dropout rate must be a number in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate!r} must be in [0, 1)")


def build_model(model_config: Mapping[str, Any], *, num_classes: int, field: str) -> nn.Module:
    """Instantiates ``model_config["name"]`` with the remaining entries as its fields.

    Args:
      model_config: a mapping with ``name`` and the model's own fields.
      num_classes: from the dataset.
      field: the config path, for error messages (e.g. ``"teacher.model"``).
    """
    entries = dict(model_config)
    if "name" not in entries:
        raise ConfigError(f"{field}.name is missing: set it to one of {', '.join(MODELS.names())}.")
    name = entries.pop("name")
    declared_classes = entries.pop("num_classes", None)
    if declared_classes is not None and int(declared_classes) != num_classes:
        raise ConfigError(
            f"{field}.num_classes={declared_classes}, but the dataset has {num_classes} classes. "
            f"Remove {field}.num_classes (it is taken from the dataset) or use a dataset with "
            f"{declared_classes} classes."
        )
    cls = MODELS.get(name, field=f"{field}.name")
    allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", *_DATA_FIELDS}
    for key in entries:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{field}.{key}: model {name!r} has no field {key!r}.{hint} "
                f"Its fields: {', '.join(sorted(allowed))}."
            )
    try:
        return cls(num_classes=num_classes, **{k: _hashable(v) for k, v in entries.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{field}: cannot build model {name!r}: {err}") from err


def init_variables(model: nn.Module, rng: jax.Array, example_input: np.ndarray) -> dict:
    """Initialises a model's variables (``params`` and, where it has any, ``batch_stats``)."""
    variables = jax.jit(lambda r, x: model.init(r, x, train=False))(
        rng, jnp.asarray(example_input[:1])
    )
    return dict(variables)


def count_params(params: Any) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
