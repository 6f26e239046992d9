"""Files written so that a reader never sees half of one: temp file in the same folder + rename."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_json_line(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def replace_stage_lines(path: str, stage: str, records: list[dict[str, Any]]) -> None:
    """Rewrites a metrics file so that ``stage``'s lines are exactly ``records`` (a resumed
    stage's finished epochs; the lines a killed run wrote after its checkpoint go away)."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("stage") != stage]
    added = [json.dumps({"stage": stage, **r}, default=str) + "\n" for r in records]
    write_text_atomic(path, "".join(kept + added))
