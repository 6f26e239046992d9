"""Stopping cleanly on SIGTERM / SIGINT: checkpoint at the next step boundary, then exit.

Schedulers (SLURM, Kubernetes, Cloud TPU maintenance) send SIGTERM some time before they kill a
job; a user presses Ctrl-C. Inside :func:`stop_on_signals`, a first such signal during training
only sets a flag: the training loop sees it after the step in flight, saves a checkpoint and
raises :class:`~kdjax.errors.Interrupted`. A second signal, or one outside training, ends the
process at once, as the signal would have without kdjax.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []  # the signals received since the handler was installed
_training = [0]  # how many training loops are running (and will see the request)


def requested() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _requested[0] if _requested else None


def _handle(signum: int, frame: object) -> None:
    del frame
    if _requested or not _training[0]:
        # A second signal (the user or scheduler will not wait for the checkpoint), or one
        # outside training (loading data, evaluating, writing results atomically), where there
        # is no step boundary to stop at and nothing half-written to lose.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _requested.append(signum)
    logger.warning(
        "%s received: saving a checkpoint after this step, then stopping (send it again to "
        "stop at once, without a checkpoint).",
        signal.Signals(signum).name,
    )


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Marks a training loop, which checks :func:`requested` at every step boundary."""
    _training[0] += 1
    try:
        yield
    finally:
        _training[0] -= 1


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Installs the handlers for the duration of a run (main thread only; elsewhere, and for
    library users who do not enter it, signals behave as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    _requested.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
