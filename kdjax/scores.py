"""Scores computed from saved logits on the host: errors, errors per class, and bias shifts.

Evaluating from logits (rather than inside the model) lets one forward pass serve every
question a table asks: how many errors, on which classes, and what a shift of some classes'
output biases would change (Hinton et al.'s transfer experiments).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def errors(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Misclassified examples: an int, or one per member for ``[members, examples, classes]``."""
    return np.sum(np.argmax(logits, -1) != labels, axis=-1)


def errors_on_class(logits: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    """Misclassified examples among those labelled ``cls``."""
    wrong = np.argmax(logits, -1) != labels
    return np.sum(wrong & (labels == cls), axis=-1)


def shift_bias(logits: np.ndarray, classes: Sequence[int], shift: float) -> np.ndarray:
    """``logits`` with ``shift`` added to the given classes: what adding ``shift`` to those
    classes' output biases does, without touching the model."""
    shifted = np.array(logits, dtype=np.float64, copy=True)
    shifted[..., list(classes)] += shift
    return shifted


def best_bias_shift(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[int], candidates: np.ndarray
) -> tuple[float, int]:
    """The shift among ``candidates`` (for one model's ``[examples, classes]`` logits) with the
    fewest errors, and that count; ties go to the smallest shift in magnitude.

    Meant for held-out validation logits, never test logits.
    """
    counts = [int(errors(shift_bias(logits, classes, s), labels)) for s in candidates]
    best = min(range(len(candidates)), key=lambda i: (counts[i], abs(candidates[i])))
    return float(candidates[best]), counts[best]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), std
