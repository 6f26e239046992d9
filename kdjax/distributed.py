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

import hashlib
import json
import logging
import os
import socket

import jax
import numpy as np
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


def _check_environment(
    address: str | None, num_processes: int | None, process_id: int | None, auto_detect: bool
) -> None:
    """Refuses a job description that cannot start, naming the variable to fix."""
    if address is None:
        if num_processes is not None or process_id is not None:
            raise ConfigError(
                f"{NUM_PROCESSES}/{PROCESS_ID} are set but {COORDINATOR} is not: set it to "
                "process 0's host:port (e.g. localhost:12355) in every process."
            )
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"{COORDINATOR}={address!r} must be process 0's host:port, e.g. localhost:12355."
        )
    if num_processes is None and process_id is None and not auto_detect:
        raise ConfigError(
            f"{COORDINATOR} is set but {NUM_PROCESSES} and {PROCESS_ID} are not: set both in "
            f"every process (or pass --distributed on a cluster JAX detects by itself; or "
            f"unset {COORDINATOR} for a one-process run)."
        )
    if (num_processes is None) != (process_id is None):
        raise ConfigError(
            f"set both {NUM_PROCESSES} and {PROCESS_ID} (or neither, on a cluster JAX detects "
            "by itself, with --distributed)."
        )
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"{NUM_PROCESSES}={num_processes} must be >= 1.")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(
            f"{PROCESS_ID}={process_id} must be in [0, {NUM_PROCESSES}={num_processes})."
        )
    if process_id == 0:
        # Process 0 serves the coordinator: a port already taken would crash JAX's service.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", int(port)))
            except OSError as err:
                raise ConfigError(
                    f"{COORDINATOR}={address}: port {port} cannot be served here ({err}): "
                    "choose a free port, the same in every process."
                ) from None


def initialize(*, auto_detect: bool = False) -> bool:
    """Joins this process to the others of its job, if there are others; returns whether it did.

    Must run before anything touches a JAX device. ``auto_detect``: ask JAX to read a
    recognised cluster's environment (SLURM, Open MPI, TPU pods) when kdjax's variables are not
    set.
    """
    address = os.environ.get(COORDINATOR)
    num_processes, process_id = _env_int(NUM_PROCESSES), _env_int(PROCESS_ID)
    _check_environment(address, num_processes, process_id, auto_detect)
    if address is None and not auto_detect:
        return False
    # CPU devices of different processes talk through gloo (GPUs and TPUs use their own
    # interconnect; this setting only concerns the CPU client, and a JAX without it has
    # another default).
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        logger.info("This JAX has no jax_cpu_collectives_implementation; using its default.")
    logger.info(
        "Joining a job of %s processes through %s (waits up to 5 minutes for all of them).",
        num_processes or "auto-detected",
        address or "the cluster's coordinator",
    )
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
    except ValueError as err:  # JAX found no cluster, or it lacks part of the description
        raise ConfigError(
            f"cannot join a multi-process job ({err}). --distributed reads a SLURM, Open MPI "
            f"or Cloud TPU environment; elsewhere set {COORDINATOR}, {NUM_PROCESSES} and "
            f"{PROCESS_ID} (BUILD.md)."
        ) from None
    if jax.device_count() != jax.local_device_count() * jax.process_count():
        raise ConfigError(
            f"process {jax.process_index()} has {jax.local_device_count()} devices but the job "
            f"{jax.device_count()} over {jax.process_count()} processes: give every process "
            "the same number of devices."
        )
    logger.info(
        "Process %d of %d: %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def check_same_job(**facts: object) -> None:
    """Refuses to start unless every process was given the same ``facts`` (the resolved config,
    the work directory): processes launched with different ones would train together on
    mismatched settings, or wait for each other forever."""
    if jax.process_count() == 1:
        return
    text = json.dumps(facts, sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differing = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differing:
        raise ConfigError(
            f"process(es) {differing} were given another {' or '.join(facts)} than process 0: "
            "launch every process with the same command, config overrides and --workdir."
        )


def is_primary() -> bool:
    """Whether this process writes the job's shared files (logs, metrics, results)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
