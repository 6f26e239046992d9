"""The whole job: fit a teacher, train the student from scratch, distill it, evaluate, report.

Work directory layout::

    config.json            the resolved config
    metrics.jsonl          one record of mean training metrics per stage and epoch
    checkpoints/<stage>/   orbax checkpoint of each trained model (see kdjax.checkpoint); while
                           the stage trains, progress/ holds its resumable checkpoints
    results.json           every number of the run
    results.md             the results table
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import checkpoint, distributed
from kdjax import workdir as workdirs
from kdjax.config import (
    check_config_fits_data,
    check_models_fit_data,
    check_performance,
    validate_config,
)
from kdjax.data import Dataset, DeviceSplit, load_dataset
from kdjax.errors import ConfigError
from kdjax.io import (
    append_json_line,
    replace_stage_lines,
    write_json_atomic,
    write_text_atomic,
)
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
from kdjax.train.loop import check_steps_per_dispatch
from kdjax.train.parallel import DataParallel, check_parallel_config
from kdjax.train.resume import TrainCheckpoints
from kdjax.train.steps import augment_options, distill_from_logits_step
from kdjax.train.teacher_cache import cached_teacher_logits

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StageOutcome:
    model: FrozenModel
    wall_time_s: float
    examples_per_s: float | None
    epochs: int
    skipped_steps: int = 0  # non-finite steps left out (on_nonfinite=skip)


def _skipped(outcome: StageOutcome) -> dict[str, Any]:
    """Steps left out as non-finite: in the results wherever there were any, never hidden."""
    return {"skipped_steps": outcome.skipped_steps} if outcome.skipped_steps else {}


def _as_json(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as it reads back from model.json (tuples become lists)."""
    return json.loads(json.dumps(dict(model_config)))


def _describe(model_config: Mapping[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in model_config.items() if k != "name")
    return f"{model_config['name']}({fields})"


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
    saved_shape = saved.get("image_shape")
    if saved_shape is not None and tuple(saved_shape) != dataset.image_shape:
        raise ConfigError(
            f"teacher.checkpoint {directory} takes images of shape {tuple(saved_shape)}, but "
            f"{dataset.name!r} has {dataset.image_shape}: reuse a teacher of the same dataset."
        )
    if saved.get("dataset") != dataset.name or saved.get("num_classes") != dataset.num_classes:
        raise ConfigError(
            f"teacher.checkpoint {directory} was trained on {saved.get('dataset')!r} "
            f"({saved.get('num_classes')} classes), not on {dataset.name!r} "
            f"({dataset.num_classes} classes): reuse a teacher of the same dataset."
        )
    model = build_model(wanted, num_classes=dataset.num_classes, field="teacher.model")
    return model, directory


@dataclasses.dataclass
class _Run:
    """What every stage of one run shares: its config, data and work directory."""

    config: Mapping[str, Any]
    dataset: Dataset
    workdir: str

    def __post_init__(self) -> None:
        self.train = DeviceSplit(self.dataset.train)
        self.test = DeviceSplit(self.dataset.test)
        validation = self.dataset.validation
        self.validation = None if validation is None else DeviceSplit(validation)
        self.example_images = self.dataset.train.images[:1]
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        self.parallel = DataParallel.from_config(self.config.get("parallel"))
        performance = self.config.get("performance", {})
        self.precision = performance.get("precision", "float32")
        self.steps_per_dispatch = performance.get("steps_per_dispatch", 1)

    def _log_metrics(self, stage: str, record: dict[str, Any]) -> None:
        if distributed.is_primary():
            append_json_line(self.metrics_path, {"stage": stage, **record})

    def _restart_metrics(self, stage: str, history: list[dict[str, Any]]) -> None:
        if distributed.is_primary():
            replace_stage_lines(self.metrics_path, stage, history)
        distributed.barrier(f"kdjax-metrics-{stage}")

    def train_model(
        self,
        role: str,
        stage: str,
        model: nn.Module,
        key: jax.Array,
        step: Any,
        operands: Mapping[str, Any] | None = None,
        train: DeviceSplit | None = None,
    ) -> StageOutcome:
        """Initialises ``model`` from ``key``; trains it with ``step`` (its array arguments in
        ``operands``) per ``config[role]``, on every device of the run, on ``train`` (the
        training split, by default; with teacher logits for a cached teacher).

        A stage that a resumed run had finished is restored, not retrained; one it had begun
        continues from its last checkpoint (``checkpoints/<stage>/progress``).
        """
        directory = os.path.join(self.workdir, "checkpoints", stage)
        init_key, dropout_key = jax.random.split(key)
        if os.path.isfile(os.path.join(directory, checkpoint.METADATA)):
            return self._restore_stage(model, directory, init_key)
        stage_config = self.config[role]
        variables = init_variables(model, init_key, self.example_images)
        total_steps = (
            self.train.steps_per_epoch(stage_config["batch_size"]) * stage_config["epochs"]
        )
        tx = make_optimizer(
            stage_config["optimizer"],
            total_steps=total_steps,
            field=f"{role}.optimizer",
            steps_per_epoch=self.train.steps_per_epoch(stage_config["batch_size"]),
        )
        progress = training_checkpoints(self.config, os.path.join(directory, "progress"))
        augmentation = augment_options(stage_config, self.dataset.padding_value)
        result = fit(
            create_train_state(model, variables, tx, dropout_key, self.precision),
            train or self.train,
            self.parallel.compile_step(step, operands, **augmentation),
            epochs=stage_config["epochs"],
            batch_size=stage_config["batch_size"],
            seed=self.config["seed"],
            name=stage,
            on_epoch_end=lambda epoch, record: self._log_metrics(stage, record),
            checkpoints=progress,
            on_start=lambda history: self._restart_metrics(stage, history),
            on_nonfinite=self.config.get("on_nonfinite", "stop"),
            parallel=self.parallel,
            steps_per_dispatch=self.steps_per_dispatch,
        )
        outcome = StageOutcome(
            result.state.frozen(),
            result.wall_time_s,
            result.examples_per_s,
            stage_config["epochs"],
            int(sum(record.get("nonfinite_steps", 0) for record in result.history)),
        )
        # Saved as soon as it is trained, so a later stage's failure cannot lose it.
        checkpoint.save_model(
            directory,
            outcome.model.variables,
            {
                "model": _as_json(self.config[role]["model"]),
                "num_classes": self.dataset.num_classes,
                "image_shape": list(self.dataset.image_shape),
                "dataset": self.dataset.name,
                "stage": stage,
                "epochs": outcome.epochs,
                "wall_time_s": outcome.wall_time_s,
                "examples_per_s": outcome.examples_per_s,
                "skipped_steps": outcome.skipped_steps,
            },
        )
        progress.delete_all()  # the model is saved; its optimizer state is no longer needed
        return outcome

    def _restore_stage(self, model: nn.Module, directory: str, key: jax.Array) -> StageOutcome:
        """A model checkpoint as a stage outcome (its training figures from model.json)."""
        abstract = jax.eval_shape(lambda: init_variables(model, key, self.example_images))
        if not self.parallel.single:  # every process restores its copy onto the mesh
            abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.parallel.replicated),
                abstract,
            )
        variables = checkpoint.restore_variables(directory, abstract)
        saved = checkpoint.read_metadata(directory)
        logger.info("Reusing the finished %s in %s.", saved.get("stage", "model"), directory)
        return StageOutcome(
            FrozenModel(model.apply, variables, precision=self.precision),
            saved.get("wall_time_s", 0.0),
            saved.get("examples_per_s"),
            saved.get("epochs", 0),
            saved.get("skipped_steps", 0),
        )

    def restore_teacher(self, model: nn.Module, directory: str, key: jax.Array) -> StageOutcome:
        """A teacher from another run: used as it is, its training not counted in this one."""
        outcome = self._restore_stage(model, directory, jax.random.split(key)[0])
        return dataclasses.replace(outcome, wall_time_s=0.0, examples_per_s=None, epochs=0)

    def distill(
        self,
        model: nn.Module,
        key: jax.Array,
        teacher: StageOutcome,
        teacher_dir: str,
    ) -> StageOutcome:
        """The distilled student: from the teacher at every step, or, with
        ``performance.teacher_cache``, from its logits computed once (and saved beside it)."""
        soft_targets = {
            "temperature": jnp.float32(self.config["student"]["temperature"]),
            "alpha": jnp.float32(self.config["student"]["alpha"]),
        }
        stage = "student_distilled"
        if not self.config.get("performance", {}).get("teacher_cache", False):
            soft_targets["teacher"] = teacher.model
            return self.train_model("student", stage, model, key, distill_step, soft_targets)
        own = os.path.join(self.workdir, "checkpoints", "teacher")
        logits = cached_teacher_logits(
            teacher.model,
            self.train,
            read_from=list(dict.fromkeys([teacher_dir, own])),
            write_to=own,
            batch_size=self.config["eval_batch_size"],
            parallel=self.parallel,
        )
        train = DeviceSplit(self.dataset.train, logits)
        return self.train_model(
            "student", stage, model, key, distill_from_logits_step, soft_targets, train
        )

    def result_row(self, stage: str, role: str, outcome: StageOutcome) -> dict[str, Any]:
        scores = evaluate(outcome.model, self.test, self.config["eval_batch_size"], self.parallel)
        logger.info(
            "%s: test accuracy %.4f (%d errors of %d)",
            stage,
            scores["accuracy"],
            scores["errors"],
            scores["count"],
        )
        return (
            {
                "stage": stage,
                "model": _describe(_as_json(self.config[role]["model"])),
                "params": count_params(outcome.model.variables["params"]),
                "test_accuracy": scores["accuracy"],
                "test_errors": scores["errors"],
                "test_loss": scores["loss"],
                "epochs": outcome.epochs,
                "train_examples_per_s": outcome.examples_per_s,
                "wall_time_s": outcome.wall_time_s,
            }
            | self._validation_scores(outcome)
            | _skipped(outcome)
        )

    def _validation_scores(self, outcome: StageOutcome) -> dict[str, Any]:
        """Accuracy on the held-out training examples, when ``dataset.validation_examples``
        asks for them: the number to choose settings by, where test accuracy must not be."""
        if self.validation is None:
            return {}
        scores = evaluate(
            outcome.model, self.validation, self.config["eval_batch_size"], self.parallel
        )
        return {"validation_accuracy": scores["accuracy"], "validation_errors": scores["errors"]}


def training_checkpoints(config: Mapping[str, Any], directory: str) -> TrainCheckpoints:
    """The resumable checkpoints of one stage, as ``config.checkpointing`` asks."""
    section = config.get("checkpointing", {})
    return TrainCheckpoints(
        directory,
        every_steps=int(section.get("every_steps", 0)),
        every_seconds=float(section.get("every_seconds", 120.0)),
        max_to_keep=int(section.get("max_to_keep", 2)),
    )


def run(config: Mapping[str, Any], workdir: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Runs the three stages and writes the work directory; returns the results dict.

    Every check (config, work directory, data, teacher checkpoint) happens before anything is
    trained or written. A work directory holding an unfinished run of the same config is
    resumed: finished stages are restored, the unfinished one continues from its checkpoint.
    """
    start = time.perf_counter()
    if "seeds" in config:
        raise ConfigError(
            "seeds: the pipeline runner trains one seed; set seed instead, or use a population "
            "runner (runner='hinton2015', see experiments/hinton2015_mnist.py)."
        )
    validate_config(config)
    check_parallel_config(config.get("parallel", {}))
    check_performance(config)
    check_steps_per_dispatch(
        config.get("performance", {}).get("steps_per_dispatch", 1),
        DataParallel.from_config(config.get("parallel")),
        field="performance.steps_per_dispatch",
    )
    teacher_checkpoint = config["teacher"].get("checkpoint", "")
    resuming = workdirs.prepare(workdir, config, overwrite=overwrite, keep=teacher_checkpoint)
    dataset = load_dataset(config["dataset"])
    check_config_fits_data(config, dataset)
    teacher_dir = os.path.join(workdir, "checkpoints", "teacher")
    if teacher_checkpoint:
        teacher_model, teacher_dir = _load_teacher(config, dataset)
    else:
        teacher_model = build_model(
            config["teacher"]["model"], num_classes=dataset.num_classes, field="teacher.model"
        )
    student_model = build_model(
        config["student"]["model"], num_classes=dataset.num_classes, field="student.model"
    )
    check_models_fit_data({"teacher.model": teacher_model, "student.model": student_model}, dataset)

    if distributed.is_primary():
        workdirs.start(workdir, config, resuming=resuming)
    distributed.barrier("kdjax-workdir")
    job = _Run(config, dataset, workdir)
    # Both students start from the same initialisation and see the same batches, so the only
    # difference between them is the teacher.
    teacher_key, student_key = jax.random.split(jax.random.key(config["seed"]))
    if teacher_checkpoint:
        teacher = job.restore_teacher(teacher_model, teacher_dir, teacher_key)
    else:
        teacher = job.train_model("teacher", "teacher", teacher_model, teacher_key, train_step)
    scratch = job.train_model("student", "student_scratch", student_model, student_key, train_step)
    distilled = job.distill(student_model, student_key, teacher, teacher_dir)

    rows = [
        job.result_row("teacher (reused)" if teacher_checkpoint else "teacher", "teacher", teacher),
        job.result_row("student_scratch", "student", scratch),
        job.result_row("student_distilled", "student", distilled),
    ]
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
        "resumed": resuming,
        "rows": rows,
        "wall_time_s": time.perf_counter() - start,
        "platform": f"{job.parallel.describe()}, jax {jax.__version__}",
        "devices": job.parallel.describe(),
    }
    # results.json last: its presence is what marks the run finished.
    if distributed.is_primary():
        write_text_atomic(os.path.join(workdir, "results.md"), results_markdown(results))
        write_json_atomic(os.path.join(workdir, "results.json"), results)
    distributed.barrier("kdjax-results")
    return results
