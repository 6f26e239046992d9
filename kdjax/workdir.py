"""A run's work directory: new, resumed, or refused, decided before anything is written.

- empty or missing: a new run;
- a finished run (``results.json``): refused, unless ``--overwrite`` replaces it;
- an unfinished run of the same config (``config.json`` equal, no ``results.json``): resumed,
  each stage from its own checkpoints; ``--overwrite`` starts it again from scratch instead;
- an unfinished run of another config: refused, naming the fields that differ (how it is
  checkpointed and ``on_nonfinite`` may change).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

from kdjax.errors import WorkdirError
from kdjax.io import write_json_atomic

logger = logging.getLogger(__name__)

# Everything a run writes into its work directory; only these are replaced by --overwrite.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "results.json", "results.md")
CONFIG = "config.json"
RESULTS = "results.json"
# Config fields an unfinished run may be resumed with changed: they decide how it is kept, on
# which devices and how fast it runs, not what it computes (a run preempted on 8 GPUs may
# resume on 4). performance.precision is not among them: it changes the arithmetic.
RESUMABLE_CHANGES = (
    "checkpointing",
    "on_nonfinite",
    "parallel",
    "performance.steps_per_dispatch",
    "performance.teacher_cache",
)


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON data, as ``config.json`` reads back (tuples become lists)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else key)
    return flat


def differences(
    saved: Mapping[str, Any], wanted: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """The config fields whose values differ, each as ``field: saved there, wanted now``."""
    a, b = _flatten(dict(saved)), _flatten(dict(wanted))
    ignored = tuple(ignore)
    found = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignored or key in ignored:
            continue
        there, now = a.get(key, "<absent>"), b.get(key, "<absent>")
        if there != now:
            found.append(f"{key}: {there!r} there, {now!r} now")
    return found


def _check_writable(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder: choose another path.")
    ancestor = os.path.abspath(workdir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"--workdir {workdir}: {ancestor} is not a writable folder: choose another path."
        )


def prepare(
    workdir: str,
    config: Mapping[str, Any],
    *,
    overwrite: bool,
    keep: str = "",
    may_differ: Iterable[str] = (),
) -> bool:
    """Decides what to do with ``workdir``; writes nothing. Returns True to resume.

    Args:
      keep: a path the run will read (a teacher to reuse): refused if ``--overwrite`` would
        delete it.
      may_differ: config fields a resumed run may change (e.g. which parts to run).
    """
    _check_writable(workdir)
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(workdir, f))]
    if not existing:
        return False
    if overwrite:
        if keep:
            inside = os.path.commonpath([os.path.abspath(keep), os.path.abspath(workdir)])
            if inside == os.path.abspath(workdir):
                raise WorkdirError(
                    f"{keep!r} lies in {workdir}, which --overwrite would delete: reuse it from "
                    "another --workdir."
                )
        return False
    if RESULTS in existing:
        raise WorkdirError(
            f"{workdir} already holds a finished kdjax run ({RESULTS}). Choose another "
            "--workdir, or pass --overwrite to replace that run."
        )
    try:
        with open(os.path.join(workdir, CONFIG)) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise WorkdirError(
            f"{workdir} holds files of a kdjax run ({', '.join(existing)}) but no readable "
            f"{CONFIG} ({err}), so it cannot be resumed: choose another --workdir, or pass "
            "--overwrite to start again from scratch."
        ) from err
    found = differences(saved, plain_config(config), ignore=(*RESUMABLE_CHANGES, *may_differ))
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise WorkdirError(
            f"{workdir} holds an unfinished run of another config ({shown}). Rerun with that "
            "run's config to resume it, choose another --workdir, or pass --overwrite to "
            "replace it."
        )
    return True


def start(workdir: str, config: Mapping[str, Any], *, resuming: bool) -> None:
    """Clears an earlier run unless resuming, and writes the resolved config."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise WorkdirError(
            f"--workdir {workdir} cannot be made ({err}): choose another path."
        ) from err
    if not resuming:
        for name in RUN_FILES:
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    logger.info("%s the run in %s.", "Resuming" if resuming else "Starting", workdir)
    path, data = os.path.join(workdir, CONFIG), plain_config(config)
    if resuming:
        with open(path) as f:
            if json.load(f) == data:
                return  # unchanged: a resume that then fails leaves the folder as it found it
    write_json_atomic(path, data)
