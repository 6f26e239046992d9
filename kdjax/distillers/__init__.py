"""The distiller zoo: every method a pure loss in its own module, registered by name.

| name | method | module |
|---|---|---|
| ``kd`` | Hinton et al. 2015 soft targets (one teacher or an ensemble) | :mod:`.kd` |
| ``fitnet`` | FitNets hints with a learned regressor (Romero et al. 2015) | :mod:`.fitnet` |
| ``at`` | attention transfer (Zagoruyko & Komodakis 2017) | :mod:`.attention` |
| ``dkd`` | decoupled KD (Zhao et al. 2022) | :mod:`.dkd` |
| ``rkd`` | relational KD, distance and angle (Park et al. 2019) | :mod:`.rkd` |
| ``pkt`` | probabilistic knowledge transfer (Passalis & Tefas 2018) | :mod:`.pkt` |
| ``sp`` | similarity-preserving KD (Tung & Mori 2019) | :mod:`.sp` |
| ``crd`` | contrastive representation distillation (Tian et al. 2020) | :mod:`.crd` |

A config names one in ``student.distiller`` (see :func:`build_distiller`); the step that
trains with it is :func:`kdjax.train.method_step.method_distill_step`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

# Registration is a side effect of importing each method's module.
from kdjax.distillers import attention, crd, dkd, fitnet, kd, pkt, rkd, sp  # noqa: E402, F401, I001
from kdjax.distillers.base import (
    DISTILLERS,
    Distiller,
    DistillInputs,
    TrainingSet,
    combine_terms,
    warmup_ramp,
)
from kdjax.errors import ConfigError

_SECTION_FIELDS = ("name", "weights", "warmup_epochs")


@dataclasses.dataclass(frozen=True)
class DistillerSpec:
    """A built ``student.distiller`` section: the method, every term's weight (``ce`` included)
    and the warm-up of the teacher's terms in epochs."""

    distiller: Distiller
    weights: dict[str, float]
    warmup_epochs: float


def build_distiller(
    section: Mapping[str, Any], *, field: str = "student.distiller"
) -> DistillerSpec:
    """Builds ``{"name": ..., "weights": {...}, "warmup_epochs": ..., **hyperparameters}``.

    Omitted weights and warm-up take the method's published defaults; every other entry is a
    hyperparameter of the method's dataclass. Typos are errors with a suggestion.
    """
    entries = dict(section)
    if "name" not in entries:
        raise ConfigError(f"{field}.name is missing: one of {', '.join(DISTILLERS.names())}.")
    cls = DISTILLERS.get(entries.pop("name"), field=f"{field}.name")
    weights = {**cls.default_weights, **dict(entries.pop("weights", None) or {})}
    warmup = float(entries.pop("warmup_epochs", cls.default_warmup_epochs))
    terms = ("ce", *cls.term_names)
    for name, value in weights.items():
        if name not in terms:
            raise ConfigError(
                f"{field}.weights.{name}: {cls.__name__} has no term {name!r}{_hint(name, terms)}"
                f" Its terms: {', '.join(terms)}."
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{field}.weights.{name}={value!r} must be a number >= 0.")
    if warmup < 0:
        raise ConfigError(f"{field}.warmup_epochs={warmup} must be >= 0 (0: no warm-up).")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in entries:
        if key not in allowed:
            raise ConfigError(
                f"{field}.{key}: {cls.__name__} has no setting {key!r}{_hint(key, allowed)} "
                f"Its settings: {', '.join([*_SECTION_FIELDS, *allowed])}."
            )
    try:
        distiller = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in entries.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{field}: {err}") from err
    return DistillerSpec(distiller, {k: float(v) for k, v in weights.items()}, warmup)


def _hint(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


__all__ = [
    "DISTILLERS",
    "Distiller",
    "DistillerSpec",
    "DistillInputs",
    "TrainingSet",
    "build_distiller",
    "combine_terms",
    "warmup_ramp",
]
