"""Data parallelism: the same training step over every device of every process.

``config.parallel`` (:func:`parallel_config`) chooses how:

- ``mode="sharded"`` (the default): ``jax.jit`` over a :class:`~jax.sharding.Mesh` with one
  axis, ``data``. Each batch is one global array split along ``data``; parameters and optimizer
  state are replicated, or with ``shard_params=True`` split FSDP-style (each array along its
  largest dimension that the device count divides; XLA gathers them where used), the teacher
  too. The step is the one-device step unchanged: it sees the global batch, so batch-norm
  statistics, losses and metrics are the global batch's (XLA inserts the all-reduces) and
  random draws are the same on any number of devices.
- ``mode="pmap"``: the step under ``jax.pmap`` with ``axis_name="data"``; losses, metrics and
  gradients are ``psum``-ed over devices as ``sum / count`` and batch norm ``psum``-s its sums
  (:mod:`kdjax.models.norm`). One process only; dropout and augmentation draw per device.

A global batch whose size the device count does not divide is padded with masked rows (a
ragged batch); the masks keep them out of every loss, metric and batch-norm statistic.

Data over processes: every process computes the same epoch order (a pure function of seed and
epoch, :func:`~kdjax.data.batching.epoch_order`) and gathers only the rows of each global batch
that its own devices hold, so each example is read by one process once per epoch.

One device and one process is the plain path: batches gathered on the device, steps as they
are (:attr:`DataParallel.single`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.data.batching import Batch, DeviceSplit, epoch_order
from kdjax.errors import ConfigError
from kdjax.train.state import FrozenModel
from kdjax.train.steps import Metrics, eval_step

PARALLEL_MODES = ("sharded", "pmap")
DATA_AXIS = "data"


def parallel_config(
    mode: str = "sharded", devices: int = 0, shard_params: bool = False
) -> ml_collections.ConfigDict:
    """How a run spreads over devices (see this module's docstring)."""
    return ml_collections.ConfigDict(
        dict(
            mode=mode,  # sharded (jit over a device mesh) | pmap
            devices=devices,  # how many devices to use, the first ones; 0: all of them
            # sharded only: split parameters, optimizer state and teacher over the devices
            # (FSDP-style) instead of a copy on each, for models too big for one device
            shard_params=shard_params,
        )
    )


def check_parallel_config(section: Mapping[str, Any], field: str = "parallel") -> None:
    """Raises :class:`ConfigError` for a ``parallel`` section kdjax cannot use here."""
    mode = section.get("mode", "sharded")
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"{field}.mode={mode!r} must be one of {', '.join(PARALLEL_MODES)}.")
    devices = section.get("devices", 0)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
        raise ConfigError(f"{field}.devices={devices!r} must be a whole number >= 0 (0: all).")
    if devices > jax.device_count():
        raise ConfigError(
            f"{field}.devices={devices}, but this job has {jax.device_count()} device(s): "
            "lower it, or 0 for all of them (to try many devices on a CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting)."
        )
    if jax.process_count() > 1 and devices not in (0, jax.device_count()):
        raise ConfigError(
            f"{field}.devices={devices}: a job of {jax.process_count()} processes uses every "
            f"device of every process; set it to 0 (all) or {jax.device_count()}."
        )
    if mode == "pmap" and jax.process_count() > 1:
        raise ConfigError(
            f"{field}.mode=pmap runs within one process; this job has {jax.process_count()}: "
            "use mode=sharded, which spans hosts."
        )
    if mode == "pmap" and section.get("shard_params", False):
        raise ConfigError(
            f"{field}.shard_params needs mode=sharded (pmap keeps a full copy on each device)."
        )


def check_one_device_runner(section: Mapping[str, Any] | None, runner: str) -> None:
    """Refuses a ``parallel`` section that asks a one-device runner for more (the vmapped
    populations of ``hinton2015`` and ``zoo``)."""
    section = dict(section or {})
    check_parallel_config(section)
    if jax.process_count() > 1:
        raise ConfigError(
            f"the {runner} runner trains its vmapped populations in one process; this job has "
            f"{jax.process_count()}: launch it as a single process, or use the pipeline runner "
            "for many hosts."
        )
    if (
        section.get("devices", 0) > 1
        or section.get("mode", "sharded") != "sharded"
        or section.get("shard_params", False)
    ):
        raise ConfigError(
            f"the {runner} runner trains its vmapped populations on one device of one process: "
            "leave config.parallel at its defaults (or devices=1), or use the pipeline runner "
            "for many devices."
        )


class DataParallel:
    """The devices a run uses and how its state and batches are laid out over them."""

    def __init__(
        self,
        devices: Sequence[jax.Device] | None = None,
        *,
        mode: str = "sharded",
        shard_params: bool = False,
    ):
        check_parallel_config({"mode": mode, "shard_params": shard_params})
        self.devices = list(jax.devices() if devices is None else devices)
        self.mode = mode
        self.shard_params = shard_params
        self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> DataParallel:
        section = dict(section or {})
        check_parallel_config(section)
        count = section.get("devices", 0) or jax.device_count()
        return cls(
            jax.devices()[:count],
            mode=section.get("mode", "sharded"),
            shard_params=bool(section.get("shard_params", False)),
        )

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def single(self) -> bool:
        """One device in one process: nothing to lay out."""
        return self.num_devices == 1 and jax.process_count() == 1

    def describe(self) -> str:
        if self.single:
            return f"1 {self.devices[0].platform} device"
        how = self.mode + (" with sharded parameters" if self.shard_params else "")
        return (
            f"{self.num_devices} {self.devices[0].platform} devices over "
            f"{jax.process_count()} process(es), {how}"
        )

    def padded(self, batch_size: int) -> int:
        """The global batch rounded up to a multiple of the device count."""
        return math.ceil(batch_size / self.num_devices) * self.num_devices

    # --- state -------------------------------------------------------------------------------

    def _param_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """FSDP's rule: split the largest dimension the device count divides; else replicate."""
        if not self.shard_params:
            return self.replicated
        candidates = [d for d in range(len(shape)) if shape[d] % self.num_devices == 0]
        if not candidates:
            return self.replicated
        dim = max(candidates, key=lambda d: shape[d])
        spec = [None] * dim + [DATA_AXIS]
        return NamedSharding(self.mesh, P(*spec))

    def shardings(self, tree: Any) -> Any:
        """The sharding of each array of a state (or teacher) under this layout."""
        return jax.tree_util.tree_map(lambda x: self._param_sharding(np.shape(x)), tree)

    def place(self, tree: Any) -> Any:
        """A state, teacher or scalars laid out for the step: on the mesh (sharded), or one copy
        per device along a new leading axis (pmap). Identity on a single device."""
        if self.single:
            return tree
        if self.mode == "pmap":
            return jax.tree_util.tree_map(self._replicate_for_pmap, tree)
        return jax.tree_util.tree_map(
            lambda x: _put_global(x, self._param_sharding(np.shape(x))), tree
        )

    def _replicate_for_pmap(self, x: Any) -> jax.Array:
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            data = self._replicate_for_pmap(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        stacked = np.broadcast_to(np.asarray(x), (self.num_devices, *np.shape(x)))
        # pmap's own outputs are laid out so (a NamedSharding over the mapped axis): its inputs
        # placed alike are used where they lie, with no copy per step.
        return jax.device_put(stacked, self.batch_sharding)

    def replicate(self, tree: Any) -> Any:
        """Values every device holds alike (a fit's running metric sums), on the mesh when the
        step's metrics are (sharded); as they are otherwise."""
        if self.single or self.mode == "pmap":
            return tree
        return jax.tree_util.tree_map(lambda x: _put_global(x, self.replicated), tree)

    def saved(self, tree: Any) -> Any:
        """A placed state as checkpoints store it: one copy (pmap), the global arrays (sharded)."""
        if self.single or self.mode != "pmap":
            return tree
        return jax.tree_util.tree_map(lambda x: x[0], tree)

    # --- steps ----------------------------------------------------------------------------------

    def compile_step(
        self, step: Any, operands: Mapping[str, Any] | None = None, **static: Any
    ) -> Any:
        """``step(state, batch, **operands, **static)`` as a function of (placed state, batch).

        ``operands`` are the step's array arguments (teacher, temperature, alpha), placed once
        here; ``static`` its static ones (augmentation). The placed state keeps its layout from
        step to step (it is donated).
        """
        operands = dict(operands or {})
        if self.single:
            return functools.partial(step, **operands, **static)
        placed = self.place(operands)
        if self.mode == "pmap":

            def body(state: Any, batch: Batch, operands: dict[str, Any]) -> Any:
                return step(state, batch, **operands, **static, axis_name=DATA_AXIS)

            mapped = jax.pmap(body, axis_name=DATA_AXIS, donate_argnums=0)

            def run_pmap(state: Any, batch: Batch) -> tuple[Any, Metrics]:
                state, metrics = mapped(state, batch, placed)
                # After the psum every device holds the same global metrics.
                return state, jax.tree_util.tree_map(lambda m: m[0], metrics)

            return run_pmap
        compiled: dict[str, Any] = {}

        def run_sharded(state: Any, batch: Batch) -> tuple[Any, Metrics]:
            if "step" not in compiled:  # built at the first call, from the state's structure
                compiled["step"] = jax.jit(
                    lambda s, b, o: step(s, b, **o, **static),
                    donate_argnums=0,
                    out_shardings=(self.shardings(state), self.replicated),
                )
            return compiled["step"](state, batch, placed)

        return run_sharded

    # --- data -----------------------------------------------------------------------------------

    def _local_rows(self, global_rows: int) -> slice:
        """The rows of a global batch that this process's devices hold."""
        if self.mode == "pmap":
            return slice(0, global_rows)
        held = self.batch_sharding.addressable_devices_indices_map((global_rows,)).values()
        ranges = [index[0].indices(global_rows)[:2] for index in held]
        return slice(min(r[0] for r in ranges), max(r[1] for r in ranges))

    def _batch(self, split: DeviceSplit, index: np.ndarray, valid: np.ndarray) -> Batch:
        """The global batch of ``index`` (padded rows: ``valid`` false), laid out for the step."""
        logits = split.host_teacher_logits
        if logits is not None and logits.ndim != 2:
            raise ConfigError(
                "a population's teacher logits are served on one device only: set "
                "parallel.devices=1 for this runner."
            )
        rows = self._local_rows(len(index))
        local_index = index[rows]
        local = {
            "image": split.host.images[local_index],
            "label": split.host.labels[local_index].astype(np.int32),
            "mask": valid[rows],
            "index": local_index.astype(np.int32),
        }
        if logits is not None:  # keyed by example index, like the images
            local["teacher_logits"] = logits[local_index]
        if self.mode == "pmap":
            return jax.tree_util.tree_map(
                lambda x: x.reshape(self.num_devices, -1, *x.shape[1:]), local
            )
        return {
            name: jax.make_array_from_process_local_data(
                self.batch_sharding, value, (len(index), *value.shape[1:])
            )
            for name, value in local.items()
        }

    def train_batches(
        self, split: DeviceSplit, batch_size: int, *, seed: int, epoch: int, start: int = 0
    ) -> Iterator[Batch]:
        """:meth:`DeviceSplit.train_batches` over the devices: the same global batches."""
        if self.single:
            yield from split.train_batches(batch_size, seed=seed, epoch=epoch, start=start)
            return
        if not isinstance(seed, int | np.integer):
            raise ConfigError(
                "population runs (several seeds at once) train on one device: set "
                "parallel.devices=1."
            )
        order = epoch_order(split.num_examples, seed=seed, epoch=epoch)
        padded = self.padded(batch_size)
        valid = np.arange(padded) < batch_size
        for step in range(start, split.steps_per_epoch(batch_size)):
            index = np.zeros(padded, np.int64)
            index[:batch_size] = order[step * batch_size : (step + 1) * batch_size]
            yield self._batch(split, index, valid)

    def eval_batches(self, split: DeviceSplit, batch_size: int) -> Iterator[Batch]:
        """Every example once, in order, the last batch padded (and masked)."""
        if self.single:
            yield from split.eval_batches(batch_size)
            return
        padded = self.padded(batch_size)
        for start in range(0, split.num_examples, batch_size):
            index = np.arange(start, start + padded)
            valid = (index < split.num_examples) & (index < start + batch_size)
            yield self._batch(split, np.where(valid, index, 0), valid)

    @functools.cached_property
    def eval_step(self) -> Any:
        """``eval_step(model, batch)`` for placed models and batches; sums over all devices.
        Built once per layout: every evaluation of a run reuses it."""
        if self.single:
            return eval_step
        if self.mode == "pmap":
            mapped = jax.pmap(eval_step)

            def run_pmap(model: FrozenModel, batch: Batch) -> Metrics:
                return jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), mapped(model, batch))

            return run_pmap
        return jax.jit(eval_step, out_shardings=self.replicated)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value in every process) as a global array with ``sharding``."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # a reshard: no host round trip
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """Host copies of (replicated) arrays, read on any process."""

    def read(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(read, tree)
