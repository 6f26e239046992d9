"""A reproduction's record: ``results.json`` (config, seeds, commit, every number) and
``results.md`` (the paper's number beside ours, mean ± std over seeds)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

import jax

from kdjax import scores
from kdjax.data import Dataset
from kdjax.io import write_json_atomic, write_text_atomic


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _mean_std(row: Mapping[str, Any], key: str = "per_seed", per_seed: str = "{:.0f}") -> str:
    """``mean ± std (seed values)``; mean and std to one decimal more than the values."""
    mean, std = scores.mean_std(row[key])
    decimals = 1 if per_seed == "{:.0f}" else 2
    seeds = ", ".join(per_seed.format(v) for v in row[key])
    return f"{mean:.{decimals}f} ± {std:.{decimals}f} ({seeds})"


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{value:.0f}"


def _errors_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| net | paper | kdjax: test errors, mean ± std (per seed) | params | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        paper = "–" if row.get("paper") is None else str(row["paper"])
        lines.append(
            f"| {row['name']} | {paper} | {_mean_std(row)} | {row.get('params', 0):,} "
            f"| {_seconds(row.get('wall_time_s'))} |"
        )
    return lines


def _shift_table(rows: list[dict[str, Any]], *, pct: bool) -> list[str]:
    lines = [
        "| student | paper | kdjax: test errors (per seed) | errors on shifted classes | shift |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if pct:
            paper = "–" if row.get("paper_pct") is None else f"{row['paper_pct']}%"
            ours = _mean_std(row, "test_error_pct", "{:.1f}") + " %"
        else:
            paper = "–" if row.get("paper") is None else str(row["paper"])
            if row.get("paper_on_class") is not None:
                paper += f" ({row['paper_on_class']} on the class)"
            ours = _mean_std(row)
        on = ", ".join(str(e) for e in row["errors_on_classes"])
        shift = "–" if row["shift"] is None else ", ".join(f"{s:+g}" for s in row["shift"])
        lines.append(
            f"| {row['name']} | {paper} | {ours} | {on} of {row['class_examples']} | {shift} |"
        )
    return lines


def _sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| student | T | kdjax: test errors, mean ± std (per seed) |", "|---|---|---|"]
    for row in rows:
        width = "-".join(str(h) for h in row["hidden_sizes"])
        lines.append(f"| {width} | {row['temperature']:g} | {_mean_std(row)} |")
    return lines


def results_markdown(results: Mapping[str, Any]) -> str:
    parts = results["parts"]
    lines = [f"# {results['name']}", "", results["rule"], ""]
    titles = {
        "teachers": "Teachers",
        "table": "Section 3's table",
        "omitted": "Transfer set without one class",
        "kept": "Transfer set of only some classes (% test error)",
        "sweep": "Temperature sweep (distilled students)",
    }
    for part, rows in parts.items():
        lines += [f"## {titles[part]}", ""]
        if part in ("teachers", "table"):
            lines += _errors_table(rows)
        elif part in ("omitted", "kept"):
            lines += _shift_table(rows, pct=part == "kept")
        else:
            lines += _sweep_table(rows)
        wall = results["part_wall_time_s"].get(part)
        lines += ["", f"Wall time of this part: {_seconds(wall)} s." if wall else "", ""]
    lines += [
        f"Seeds {results['seeds']}; total wall time {results['wall_time_s']:.0f} s on "
        f"{results['platform']}; commit {results['commit']}.",
        "",
    ]
    return "\n".join(lines)


RULE = (
    "Every number is the model after its last epoch, evaluated once on the 10,000 test images "
    "(no early stopping, nothing chosen on the test set); bias shifts are chosen per seed on a "
    "validation split held out of the training data."
)


def write_report(
    results: dict[str, Any],
    config: Mapping[str, Any],
    workdir: str,
    dataset: Dataset,
    paper: Mapping[str, Any],
) -> None:
    """Completes ``results`` (which names its ``commit``) with what makes it reproducible, and
    writes both files atomically."""
    results |= {"name": config.get("name", "reproduction"), "rule": RULE, "paper": dict(paper)}
    publish(results, results_markdown, config, workdir, dataset)


def publish(
    results: dict[str, Any],
    to_markdown: Any,
    config: Mapping[str, Any],
    workdir: str,
    dataset: Dataset,
) -> None:
    """Adds to ``results`` what makes it reproducible (config, seeds, platform, data sizes) and
    writes ``results.json`` and ``to_markdown(results)`` atomically into ``workdir``, and into
    ``config.results_dir`` as ``<name>.json`` / ``.md`` when it is set."""
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    results |= {
        "config": json.loads(json.dumps(plain)),
        "seeds": [int(s) for s in config["seeds"]],
        "platform": f"one {jax.default_backend()} device, jax {jax.__version__}",
        "dataset": {
            "name": dataset.name,
            "train_examples": len(dataset.train),
            "test_examples": len(dataset.test),
        },
    }
    markdown = to_markdown(results)
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    write_text_atomic(os.path.join(workdir, "results.md"), markdown)
    # The copy that is committed: the results without the work directory's checkpoints.
    published = config.get("results_dir", "")
    if published:
        write_json_atomic(os.path.join(published, f"{results['name']}.json"), results)
        write_text_atomic(os.path.join(published, f"{results['name']}.md"), markdown)
