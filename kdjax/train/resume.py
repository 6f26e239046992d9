"""Training checkpoints for exact resume: the whole train state and where the loop stood.

One folder per saved step (orbax ``CheckpointManager``, at most ``max_to_keep`` of them), holding

- ``state``: the train state's arrays (params, batch statistics, optimizer state, step, RNG key);
  for a population every array has its member axis;
- ``epoch_sums``: the running sums of the unfinished epoch's metrics, so a resumed epoch logs
  the same means as an uninterrupted one;
- ``progress`` (JSON): :class:`Progress`, the loop's step, finished epochs' metrics, time spent.

The data position needs nothing more: an epoch's batch order is a pure function of
``(seed, epoch)`` (:func:`kdjax.data.batching.epoch_order`) and the loop's step gives the epoch
and the batch within it.

Atomic and verified. orbax writes a step into a temporary folder and renames it when complete
(its temporary folders are deleted at the next start). kdjax then writes ``kdjax-sha256.json``
into the step folder (atomically), the SHA-256 of every file. A step folder without that file
is a save that was cut off: it is ignored and deleted. A file that is missing or whose hash
differs is corruption: :class:`CheckpointError` names it; a run never restarts from scratch
silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import serialization

from kdjax import distributed
from kdjax.errors import CheckpointError
from kdjax.io import write_json_atomic

logger = logging.getLogger(__name__)

MANIFEST = "kdjax-sha256.json"


@dataclasses.dataclass
class Progress:
    """Where a fit stands: everything the loop needs besides arrays."""

    step: int = 0  # optimizer steps done (the same for every member of a population)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # finished epochs
    wall_time_s: float = 0.0  # spent training so far, over every process that worked on it
    # Throughput counters: compiling steps are left out, so a resume does not distort them.
    steady_examples: int = 0
    steady_time_s: float = 0.0


def _state_tree(state: Any) -> dict[str, Any]:
    """The train state's arrays as a nested dict (optax's named tuples become dicts); the RNG
    key as its raw ``uint32`` data, which every orbax version can store."""
    return serialization.to_state_dict(state.replace(rng=jax.random.key_data(state.rng)))


def _restore_state(template: Any, tree: dict[str, Any]) -> Any:
    """``template`` (a train state) with the arrays of ``tree``, its key rewrapped."""
    raw = serialization.from_state_dict(
        template.replace(rng=jax.random.key_data(template.rng)), tree
    )
    impl = jax.random.key_impl(template.rng)
    return raw.replace(rng=jax.random.wrap_key_data(raw.rng, impl=impl))


def _file_hashes(step_dir: str) -> dict[str, str]:
    hashes = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if relative == MANIFEST:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            hashes[relative] = digest.hexdigest()
    return dict(sorted(hashes.items()))


class TrainCheckpoints:
    """The resumable checkpoints of one training run (a stage, or a population), in
    ``directory``.

    Args:
      directory: the orbax manager's folder (created on the first save).
      every_steps: save after every this many steps (0: not by steps).
      every_seconds: save at the first step boundary this long after the last save (0: not
        by time). Where checkpoints fall never changes the result: resuming from any step is
        exact. The last step, and the step at which a run is interrupted, are always saved.
      max_to_keep: how many saved steps to keep (older ones are deleted, the newest kept).
    """

    def __init__(
        self,
        directory: str,
        *,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        max_to_keep: int = 2,
    ):
        self.directory = os.path.abspath(directory)  # orbax refuses relative paths
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.max_to_keep = max_to_keep
        self._manager: ocp.CheckpointManager | None = None
        self._last_save = time.monotonic()

    # --- which steps exist --------------------------------------------------------------------

    def _step_dirs(self) -> dict[int, str]:
        if not os.path.isdir(self.directory):
            return {}
        return {
            int(name): os.path.join(self.directory, name)
            for name in os.listdir(self.directory)
            if name.isdigit() and os.path.isdir(os.path.join(self.directory, name))
        }

    def _drop_unfinished_saves(self) -> None:
        """Deletes step folders that a cut-off save left behind (orbax's temporary folders,
        and finished orbax folders that kdjax had not yet verified); the primary process
        deletes, the others wait for it."""
        if distributed.is_primary():
            self._delete_unfinished()
        distributed.barrier("kdjax-drop-unfinished")

    def _delete_unfinished(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            unverified = name.isdigit() and not os.path.isfile(os.path.join(path, MANIFEST))
            if os.path.isdir(path) and (unverified or ".orbax-checkpoint-tmp" in name):
                logger.warning(
                    "Ignoring the unfinished checkpoint %s (its save was cut off).", path
                )
                shutil.rmtree(path)

    def verified_steps(self) -> list[int]:
        """Steps with a complete, verified checkpoint, oldest first (drops unfinished saves)."""
        self._drop_unfinished_saves()
        return sorted(self._step_dirs())

    def _verify(self, step: int) -> None:
        step_dir = self._step_dirs()[step]
        manifest_path = os.path.join(step_dir, MANIFEST)
        try:
            with open(manifest_path) as f:
                recorded = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"checkpoint {step_dir} has an unreadable {MANIFEST} ({err}). "
                + self._fix_hint(step)
            ) from err
        actual = _file_hashes(step_dir)
        for relative, digest in recorded.items():
            path = os.path.join(step_dir, relative)
            if relative not in actual:
                raise CheckpointError(f"checkpoint file {path} is missing. " + self._fix_hint(step))
            if actual[relative] != digest:
                raise CheckpointError(
                    f"checkpoint file {path} is corrupted (its SHA-256 differs from the one "
                    "recorded when it was written). " + self._fix_hint(step)
                )

    def _fix_hint(self, step: int) -> str:
        older = [s for s in self._step_dirs() if s < step]
        if older:
            return (
                f"Fix: delete {os.path.join(self.directory, str(step))} to resume from step "
                f"{max(older)}, or pass --overwrite to start this run again from scratch."
            )
        return (
            "No older checkpoint is left: pass --overwrite to start this run again from "
            "scratch (or restore the file from a backup)."
        )

    # --- save and restore ------------------------------------------------------------------

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                # Synchronous: a save has finished (and been verified) before training goes
                # on, so an interruption right after it cannot lose it.
                enable_async_checkpointing=False,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def due(self, step: int, *, by_time: bool = True, since: int | None = None) -> bool:
        """Whether the loop saves after ``step`` (besides the last step and interruptions).
        ``by_time=False``: only by steps (the same in every process of a job). ``since``: the
        step before the last dispatch, which may have run several; due if any of them was."""
        since = step - 1 if since is None else since
        if self.every_steps and step // self.every_steps > since // self.every_steps:
            return True
        return (
            by_time
            and bool(self.every_seconds)
            and time.monotonic() - self._last_save >= self.every_seconds
        )

    def save(self, state: Any, epoch_sums: Any, progress: Progress) -> None:
        manager = self._open()
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            epoch_sums=ocp.args.StandardSave(epoch_sums),
            progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
        )
        manager.save(progress.step, args=items, force=True)
        manager.wait_until_finished()
        distributed.barrier(f"kdjax-checkpoint-{progress.step}-written")
        step_dir = os.path.join(self.directory, str(progress.step))
        if distributed.is_primary():
            write_json_atomic(
                os.path.join(step_dir, MANIFEST),
                {"step": progress.step, "files": _file_hashes(step_dir)},
            )
        distributed.barrier(f"kdjax-checkpoint-{progress.step}-verified")
        self._last_save = time.monotonic()

    def restore_latest(self, state: Any, epoch_sums: Any) -> tuple[Any, Any, Progress] | None:
        """The newest verified checkpoint, shaped like ``state`` and ``epoch_sums`` (templates
        with the right structure, shapes and dtypes), or None if there is none."""
        steps = self.verified_steps()
        if not steps:
            return None
        step = steps[-1]
        self._verify(step)
        abstract = jax.tree_util.tree_map(
            # Restored onto the template's devices and layout (the mesh of a many-device run).
            lambda x: jax.ShapeDtypeStruct(
                jnp.shape(x), jnp.result_type(x), sharding=getattr(x, "sharding", None)
            ),
            {"state": _state_tree(state), "epoch_sums": epoch_sums},
        )
        try:
            restored = self._open().restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract["state"]),
                    epoch_sums=ocp.args.StandardRestore(abstract["epoch_sums"]),
                    progress=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax raises many types for a checkpoint it cannot read
            raise CheckpointError(
                f"cannot restore the checkpoint {os.path.join(self.directory, str(step))}: "
                f"{' '.join(str(err).split())[:400]}. It was written for another model, "
                "optimizer or config. " + self._fix_hint(step)
            ) from err
        progress = Progress(**restored["progress"])
        logger.info("Resuming from step %d (%s).", progress.step, self.directory)
        return _restore_state(state, dict(restored["state"])), restored["epoch_sums"], progress

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def delete_all(self) -> None:
        """Removes every checkpoint (once the trained model is saved elsewhere)."""
        self.close()
        if distributed.is_primary():
            shutil.rmtree(self.directory, ignore_errors=True)
        distributed.barrier("kdjax-delete-checkpoints")
