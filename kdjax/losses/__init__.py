"""Distillation losses: pure functions of arrays, unweighted, never reading a config.

Every loss here is computed from ``log_softmax`` (never the log of a separately computed
softmax), upcasts half-precision inputs to float32, and averages over the *valid* examples of
a batch (``mask``), so padded examples never move a loss.

- :func:`cross_entropy` -- the hard-label term.
- :func:`soft_kl` -- Hinton's soft-target term, ``T^2 * KL(teacher_T || student_T)``.
- :func:`kd_loss` -- their mix, ``(1 - alpha) * cross_entropy + alpha * soft_kl``.
"""

from kdjax.losses.classification import cross_entropy, kd_loss, soft_kl

__all__ = ["cross_entropy", "kd_loss", "soft_kl"]
