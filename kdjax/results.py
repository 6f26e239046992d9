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
    ("validation_accuracy", "validation accuracy", "{:.2%}"),
    ("skipped_steps", "skipped non-finite steps", "{:,}"),
    ("train_examples_per_s", "train examples/s", "{:,.0f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    # A column no row has (validation accuracy without a validation split) is left out.
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |"
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
