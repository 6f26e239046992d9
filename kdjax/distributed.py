"""Many processes (hosts) running one job: start-up, who writes files, and barriers.

Every process runs the same program on its own devices; JAX's collectives join them. A job
becomes multi-process when :func:`initialize` finds it is one of several, from

- ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with ``KDJAX_NUM_PROCESSES`` and
  ``KDJAX_PROCESS_ID`` (e.g. several processes on one machine, or a hand-made launch); or
- a cluster JAX recognises by itself (SLURM, Open MPI, Cloud TPU pod slices, Kubernetes) when
  ``kdjax --distributed`` is given.

Only the primary process (index 0) writes logs, metrics and results; checkpoints are written
by orbax from every process (each its own shards) with kdjax's manifest written by the primary.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

from kdjax.errors import ConfigError

logger = logging.getLogger(__name__)

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "KDJAX_NUM_PROCESSES"
PROCESS_ID = "KDJAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be a whole number.") from None


def initialize(*, auto_detect: bool = False) -> bool:
    """Joins this process to the others of its job, if there are others; returns whether it did.

    Must run before anything touches a JAX device. ``auto_detect``: ask JAX to read a
    recognised cluster's environment (SLURM, Open MPI, TPU pods) when kdjax's variables are not
    set.
    """
    address = os.environ.get(COORDINATOR)
    num_processes, process_id = _env_int(NUM_PROCESSES), _env_int(PROCESS_ID)
    if address is None and not auto_detect:
        if num_processes is not None or process_id is not None:
            raise ConfigError(
                f"{NUM_PROCESSES}/{PROCESS_ID} are set but {COORDINATOR} is not: set it to "
                "process 0's host:port (e.g. localhost:12355) in every process."
            )
        return False
    if address is not None and (num_processes is None) != (process_id is None):
        raise ConfigError(
            f"set both {NUM_PROCESSES} and {PROCESS_ID} (or neither, on a cluster JAX detects "
            "by itself)."
        )
    if num_processes is not None and not 0 <= (process_id or 0) < num_processes:
        raise ConfigError(
            f"{PROCESS_ID}={process_id} must be in [0, {NUM_PROCESSES}={num_processes})."
        )
    # CPU devices of different processes talk through gloo (GPUs and TPUs use their own
    # interconnect; this setting only concerns the CPU client, and a JAX without it has
    # another default).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        logger.info("This JAX has no jax_cpu_collectives_implementation; using its default.")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    logger.info(
        "Process %d of %d: %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_primary() -> bool:
    """Whether this process writes the job's shared files (logs, metrics, results)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
