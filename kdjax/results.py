"""The results of a run: ``results.json`` (everything) and ``results.md`` (the table)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

COLUMNS = (
    ("stage", "stage", "{}"),
    ("model", "model", "{}"),
    ("params", "params", "{:,}"),
    ("test_accuracy", "test accuracy", "{:.2%}"),
    ("test_errors", "test errors", "{:,}"),
    ("train_examples_per_s", "train examples/s", "{:,.0f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = [
        "| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def results_markdown(results: dict[str, Any]) -> str:
    data = results["dataset"]
    lines = [
        f"# {results['name']}",
        "",
        f"Dataset `{data['name']}`: {data['train_examples']:,} training and "
        f"{data['test_examples']:,} test examples. Student distilled at T = "
        f"{results['temperature']:g}, alpha = {results['alpha']:g}. Accuracy is on the whole "
        "test split, after the last epoch.",
        "",
        markdown_table(results["rows"]),
        "",
        f"Total wall time {results['wall_time_s']:.1f} s on {results['platform']}.",
        "",
    ]
    return "\n".join(lines)
