"""Saving and restoring a trained model with orbax-checkpoint.

A model checkpoint is a folder with ``variables/`` (orbax: params and batch statistics) and
``model.json`` (its architecture, classes and input shape). ``model.json`` is written last, so a
folder without it is an unfinished save and is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from kdjax import distributed
from kdjax.errors import ConfigError
from kdjax.io import write_json_atomic

VARIABLES = "variables"
METADATA = "model.json"


def save_model(directory: str, variables: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Saves ``variables`` (called by every process of a multi-process job: orbax writes each
    process's shards; the primary writes ``model.json``)."""
    directory = os.path.abspath(directory)
    target = os.path.join(directory, VARIABLES)
    if distributed.is_primary():
        os.makedirs(directory, exist_ok=True)
        # Without model.json beside it, an existing variables/ is a save that was cut off.
        shutil.rmtree(target, ignore_errors=True)
    distributed.barrier("kdjax-save-model-start")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    distributed.barrier("kdjax-save-model-written")
    if distributed.is_primary():
        write_json_atomic(os.path.join(directory, METADATA), metadata)
    distributed.barrier("kdjax-save-model-done")


def find_model_checkpoint(path: str, role: str) -> str:
    """``path`` is a model checkpoint folder or a run's work directory holding one for ``role``."""
    for candidate in (path, os.path.join(path, "checkpoints", role)):
        if os.path.isfile(os.path.join(candidate, METADATA)):
            return os.path.abspath(candidate)
    raise ConfigError(
        f"{path!r} holds no finished {role} checkpoint (no {METADATA} in it or in "
        f"checkpoints/{role}/): give the work directory of a kdjax run whose {role} finished."
    )


def read_metadata(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, METADATA)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read checkpoint metadata {path}: {err}") from err


def restore_variables(directory: str, abstract_variables: Any) -> dict[str, Any]:
    """Restores variables shaped like ``abstract_variables`` (from ``jax.eval_shape``)."""
    # orbax refuses relative paths, and a work directory given as runs/NAME is one.
    path = os.path.abspath(os.path.join(directory, VARIABLES))
    # Without a layout of its own, a variable lands on this process's first device, whatever
    # devices wrote it (a teacher trained on 8 GPUs is reused on one).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_variables = jax.tree_util.tree_map(
        lambda x: (
            x
            if getattr(x, "sharding", None) is not None
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here)
        ),
        abstract_variables,
    )
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract_variables)
    except Exception as err:  # orbax raises several types for missing/corrupt/mismatched data
        raise ConfigError(
            f"cannot restore the checkpoint in {path}: {err}. Check that it was written by kdjax "
            "for the same architecture."
        ) from err
    return restored
