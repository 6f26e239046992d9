"""The whole job: fit a teacher, train the student from scratch, distill it, evaluate, report.

Work directory layout::

    config.json            the resolved config
    metrics.jsonl          one record of mean training metrics per stage and epoch
    checkpoints/<stage>/   orbax checkpoint of each trained model (see kdjax.checkpoint)
    results.json           every number of the run
    results.md             the results table
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import checkpoint
from kdjax.config import check_config_fits_data, validate_config
from kdjax.data import Dataset, DeviceSplit, load_dataset
from kdjax.errors import ConfigError, WorkdirError
from kdjax.io import append_json_line, write_json_atomic, write_text_atomic
from kdjax.models import build_model, count_params, init_variables
from kdjax.results import results_markdown
from kdjax.train import (
    FrozenModel,
    create_train_state,
    distill_step,
    evaluate,
    fit,
    make_optimizer,
    train_step,
)

logger = logging.getLogger(__name__)

# Everything a run writes into its work directory; only these are replaced by --overwrite.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "results.json", "results.md")
STAGES = ("teacher", "student_scratch", "student_distilled")


@dataclasses.dataclass
class StageOutcome:
    model: FrozenModel
    wall_time_s: float
    examples_per_s: float | None
    epochs: int


def _as_json(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as it reads back from model.json (tuples become lists)."""
    return json.loads(json.dumps(dict(model_config)))


def _describe(model_config: Mapping[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in model_config.items() if k != "name")
    return f"{model_config['name']}({fields})"


def check_workdir(workdir: str, *, overwrite: bool, teacher_checkpoint: str) -> None:
    """Refuses to replace an earlier run unless asked, and never a teacher we are about to reuse."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(workdir, f))]
    if existing and not overwrite:
        raise WorkdirError(
            f"{workdir} already holds a kdjax run ({', '.join(existing)}). Choose another "
            "--workdir, or pass --overwrite to replace that run."
        )
    if existing and teacher_checkpoint:
        inside = os.path.commonpath([os.path.abspath(teacher_checkpoint), os.path.abspath(workdir)])
        if inside == os.path.abspath(workdir):
            raise WorkdirError(
                f"teacher.checkpoint={teacher_checkpoint!r} lies in {workdir}, which --overwrite "
                "would delete: reuse it from another --workdir."
            )


def _clear_run_files(workdir: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _load_teacher(config: Mapping[str, Any], dataset: Dataset) -> tuple[nn.Module, str]:
    """Checks that ``teacher.checkpoint`` matches ``teacher.model`` and the data; no restore yet."""
    directory = checkpoint.find_model_checkpoint(config["teacher"]["checkpoint"], "teacher")
    saved = checkpoint.read_metadata(directory)
    wanted = _as_json(config["teacher"]["model"])
    if saved.get("model") != wanted:
        raise ConfigError(
            f"teacher.checkpoint {directory} holds {_describe(saved.get('model', {'name': '?'}))}"
            f", but teacher.model is {_describe(wanted)}: set teacher.model to the saved "
            "architecture, or fit a new teacher (empty teacher.checkpoint)."
        )
    if saved.get("dataset") != dataset.name or saved.get("num_classes") != dataset.num_classes:
        raise ConfigError(
            f"teacher.checkpoint {directory} was trained on {saved.get('dataset')!r} "
            f"({saved.get('num_classes')} classes), not on {dataset.name!r} "
            f"({dataset.num_classes} classes): reuse a teacher of the same dataset."
        )
    model = build_model(wanted, num_classes=dataset.num_classes, field="teacher.model")
    return model, directory


def _train_stage(
    role: str,
    stage: str,
    config: Mapping[str, Any],
    model: nn.Module,
    train: DeviceSplit,
    example_images: Any,
    *,
    key: jax.Array,
    step_fn: Any,
    metrics_path: str,
) -> StageOutcome:
    """Initialises ``model`` from ``key`` and trains it with ``step_fn`` per ``config[role]``."""
    stage_config = config[role]
    init_key, dropout_key = jax.random.split(key)
    variables = init_variables(model, init_key, example_images)
    total_steps = train.steps_per_epoch(stage_config["batch_size"]) * stage_config["epochs"]
    tx = make_optimizer(
        stage_config["optimizer"], total_steps=total_steps, field=f"{role}.optimizer"
    )
    state = create_train_state(model, variables, tx, dropout_key)
    result = fit(
        state,
        train,
        step_fn,
        epochs=stage_config["epochs"],
        batch_size=stage_config["batch_size"],
        seed=config["seed"],
        name=stage,
        on_epoch_end=lambda epoch, record: append_json_line(
            metrics_path, {"stage": stage, **record}
        ),
    )
    return StageOutcome(
        result.state.frozen(), result.wall_time_s, result.examples_per_s, stage_config["epochs"]
    )


def run(config: Mapping[str, Any], workdir: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Runs the three stages and writes the work directory; returns the results dict.

    Every check (config, work directory, data, teacher checkpoint) happens before anything is
    trained or written.
    """
    start = time.perf_counter()
    validate_config(config)
    teacher_checkpoint = config["teacher"].get("checkpoint", "")
    check_workdir(workdir, overwrite=overwrite, teacher_checkpoint=teacher_checkpoint)
    dataset = load_dataset(config["dataset"])
    check_config_fits_data(config, dataset)
    teacher_model = build_model(
        config["teacher"]["model"], num_classes=dataset.num_classes, field="teacher.model"
    )
    if teacher_checkpoint:
        teacher_model, teacher_dir = _load_teacher(config, dataset)
    student_model = build_model(
        config["student"]["model"], num_classes=dataset.num_classes, field="student.model"
    )

    os.makedirs(workdir, exist_ok=True)
    _clear_run_files(workdir)
    write_json_atomic(
        os.path.join(workdir, "config.json"),
        config.to_dict() if hasattr(config, "to_dict") else dict(config),
    )
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    train, test = DeviceSplit(dataset.train), DeviceSplit(dataset.test)
    example_images = dataset.train.images[:1]
    root_key = jax.random.key(config["seed"])
    # Both students start from the same initialisation and see the same batches, so the only
    # difference between them is the teacher.
    teacher_key, student_key = jax.random.split(root_key)
    train_stage = functools.partial(
        _train_stage,
        config=config,
        train=train,
        example_images=example_images,
        metrics_path=metrics_path,
    )

    outcomes: dict[str, StageOutcome] = {}
    if teacher_checkpoint:
        abstract = jax.eval_shape(
            lambda: init_variables(teacher_model, teacher_key, example_images)
        )
        variables = checkpoint.restore_variables(teacher_dir, abstract)
        outcomes["teacher"] = StageOutcome(
            FrozenModel(teacher_model.apply, variables), 0.0, None, 0
        )
        logger.info("Reusing the teacher in %s.", teacher_dir)
    else:
        outcomes["teacher"] = train_stage(
            "teacher", "teacher", model=teacher_model, key=teacher_key, step_fn=train_step
        )
    outcomes["student_scratch"] = train_stage(
        "student", "student_scratch", model=student_model, key=student_key, step_fn=train_step
    )
    distill = functools.partial(
        distill_step,
        teacher=outcomes["teacher"].model,
        temperature=jnp.float32(config["student"]["temperature"]),
        alpha=jnp.float32(config["student"]["alpha"]),
    )
    outcomes["student_distilled"] = train_stage(
        "student", "student_distilled", model=student_model, key=student_key, step_fn=distill
    )

    rows = []
    for stage in STAGES:
        outcome = outcomes[stage]
        role = "teacher" if stage == "teacher" else "student"
        model_config = _as_json(config[role]["model"])
        if not (stage == "teacher" and teacher_checkpoint):
            checkpoint.save_model(
                os.path.join(workdir, "checkpoints", stage),
                outcome.model.variables,
                {
                    "model": model_config,
                    "num_classes": dataset.num_classes,
                    "image_shape": list(dataset.image_shape),
                    "dataset": dataset.name,
                    "stage": stage,
                },
            )
        scores = evaluate(outcome.model, test, config["eval_batch_size"])
        rows.append(
            {
                "stage": stage + (" (reused)" if stage == "teacher" and teacher_checkpoint else ""),
                "model": _describe(model_config),
                "params": count_params(outcome.model.variables["params"]),
                "test_accuracy": scores["accuracy"],
                "test_errors": scores["errors"],
                "test_loss": scores["loss"],
                "epochs": outcome.epochs,
                "train_examples_per_s": outcome.examples_per_s,
                "wall_time_s": outcome.wall_time_s,
            }
        )
        logger.info(
            "%s: test accuracy %.4f (%d errors of %d)",
            stage,
            scores["accuracy"],
            scores["errors"],
            scores["count"],
        )

    results = {
        "name": config.get("name", "kdjax"),
        "dataset": {
            "name": dataset.name,
            "train_examples": len(dataset.train),
            "test_examples": len(dataset.test),
            "num_classes": dataset.num_classes,
        },
        "temperature": float(config["student"]["temperature"]),
        "alpha": float(config["student"]["alpha"]),
        "teacher_checkpoint": teacher_checkpoint or None,
        "rows": rows,
        "wall_time_s": time.perf_counter() - start,
        "platform": (
            f"{jax.default_backend()} ({jax.device_count()} device(s)), jax {jax.__version__}"
        ),
    }
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    write_text_atomic(os.path.join(workdir, "results.md"), results_markdown(results))
    return results
