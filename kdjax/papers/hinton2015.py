"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", section 3.

Every row is a population of seeds (or seeds x temperatures) trained in one compiled program
(:mod:`kdjax.train.population`), so each number is reported as mean ± std over seeds with the
per-seed values beside it. The reporting rule: the model after its last epoch, evaluated once
on the 10,000 test images; no early stopping, and nothing is chosen on the test set (the
transfer experiments' bias shifts are chosen on a validation split held out of the training
data, which those students never train on).

Parts (``config.parts``):

- ``table``: the dropout+jitter teacher, the student from hard labels alone, and the same
  student distilled at ``student.temperature`` (``alpha`` weighs the soft term).
- ``omitted``: the student distilled on a transfer set without ``transfer.omitted_class``;
  then that class's output bias is raised by the shift that is best on validation.
- ``kept``: the student distilled on a transfer set of only ``transfer.kept_classes``; then
  their biases are lowered by the shift that is best on validation.
- ``sweep``: the distilled student at each of ``sweep.temperatures``, for each width in
  ``sweep.hidden_sizes``.

Students are distilled from teacher logits computed once per teacher (the transfer sets are
not jittered); the teachers are checkpointed in the work directory and reused by a rerun there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint, scores
from kdjax import workdir as workdirs
from kdjax.config import (
    check_config_fits_data,
    check_models_fit_data,
    check_performance,
    check_temperature,
    validate_config,
)
from kdjax.data import Dataset, DeviceSplit, Split, load_dataset
from kdjax.data.datasets import validation_indices
from kdjax.errors import ConfigError
from kdjax.io import append_json_line, replace_stage_lines
from kdjax.models import build_model, count_params
from kdjax.papers.report import git_commit, write_report
from kdjax.pipeline import training_checkpoints
from kdjax.train.loop import FitResult
from kdjax.train.parallel import check_one_device_runner
from kdjax.train.population import (
    fit_population,
    population_distill_from_logits_step,
    population_train_step,
    predict_logits,
)
from kdjax.train.resume import TrainCheckpoints
from kdjax.train.state import FrozenModel
from kdjax.train.steps import augment_options

logger = logging.getLogger(__name__)

PARTS = ("table", "omitted", "kept", "sweep")
# Section 3's numbers (test errors of 10,000, or % test error for the 7s-and-8s student).
PAPER = {
    "teacher": 67,
    "student_scratch": 146,
    "student_distilled": 74,
    "omitted_before": 206,
    "omitted_before_on_class": 133,
    "omitted_after": 109,
    "omitted_after_on_class": 14,
    "kept_before_pct": 47.3,
    "kept_after_pct": 13.2,
}


@dataclasses.dataclass
class Population:
    """Trained members of one architecture and what they cost."""

    frozen: FrozenModel  # variables with a leading member axis
    params: int  # of one member
    wall_time_s: float
    examples_per_s: float | None

    @classmethod
    def of(cls, result: FitResult) -> Population:
        """The trained members of a population's fit, with its timings."""
        frozen = result.state.frozen()
        params = count_params(jax.tree_util.tree_map(lambda x: x[0], frozen.variables["params"]))
        return cls(frozen, params, result.wall_time_s, result.examples_per_s)


def _role_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """(teacher keys, student keys): seed ``s`` splits ``key(s)`` as ``kdjax.pipeline`` does,
    so member ``m`` is initialised exactly like a lone run with ``seed = seeds[m]``."""
    pairs = jnp.stack([jax.random.split(jax.random.key(int(s))) for s in seeds])
    return pairs[:, 0], pairs[:, 1]


@dataclasses.dataclass
class Reproduction:
    """One reproduction's config, data, seeds and work directory, shared by its parts."""

    config: Mapping[str, Any]
    dataset: Dataset
    workdir: str

    def __post_init__(self) -> None:
        self.seeds = [int(s) for s in self.config["seeds"]]
        self.teacher_keys, self.student_keys = _role_keys(self.seeds)
        self.train = DeviceSplit(self.dataset.train)
        self.test = DeviceSplit(self.dataset.test)
        self.num_classes = self.dataset.num_classes
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")

    # --- training -------------------------------------------------------------------------

    def _log_epoch(self, name: str):
        return lambda epoch, record: append_json_line(self.metrics_path, {"stage": name, **record})

    def progress(self, name: str) -> TrainCheckpoints:
        """The resumable checkpoints of population ``name`` (kept until the run finishes)."""
        return training_checkpoints(
            self.config, os.path.join(self.workdir, "checkpoints", "progress", name)
        )

    def _model(self, role: str, **overrides: Any) -> nn.Module:
        model_config = dict(self.config[role]["model"]) | overrides
        return build_model(model_config, num_classes=self.num_classes, field=f"{role}.model")

    def fit_options(self, name: str) -> dict[str, Any]:
        """What every population's fit shares: its metrics lines, resumable checkpoints and
        non-finite policy."""
        return dict(
            name=name,
            on_epoch_end=self._log_epoch(name),
            checkpoints=self.progress(name),
            on_start=lambda history: replace_stage_lines(self.metrics_path, name, history),
            on_nonfinite=self.config.get("on_nonfinite", "stop"),
            steps_per_dispatch=self.config.get("performance", {}).get("steps_per_dispatch", 1),
        )

    def _fit(self, name, role, model, split, seeds, keys, step_fn) -> Population:
        result = fit_population(
            model,
            self.config[role],
            split,
            seeds,
            keys,
            step_fn,
            field=role,
            **self.fit_options(name),
        )
        return Population.of(result)

    def teachers(self) -> Population:
        """The teacher population: restored from this work directory if a rerun finds it there,
        else trained and saved at once."""
        directory = os.path.join(self.workdir, "checkpoints", "teachers")
        model = self._model("teacher")
        metadata = {
            "teacher": workdirs.plain_config(self.config["teacher"]),
            "seeds": self.seeds,
            "dataset": self.dataset.name,
            "num_classes": self.num_classes,
        }
        saved = _saved_metadata(directory)
        if saved is not None:
            if {k: saved.get(k) for k in metadata} != metadata:
                raise ConfigError(
                    f"{directory} holds teachers of another config or other seeds: use another "
                    "--workdir, or pass --overwrite to train new ones."
                )
            abstract = jax.eval_shape(
                lambda: jax.vmap(lambda k: model.init(k, self.train.images[:1], train=False))(
                    self.teacher_keys
                )
            )
            variables = checkpoint.restore_variables(directory, dict(abstract))
            logger.info("Reusing the teachers in %s.", directory)
            return Population(
                FrozenModel(model.apply, variables),
                saved["params"],
                saved["wall_time_s"],
                saved["examples_per_s"],
            )
        step = _with_shift(
            population_train_step, self.config["teacher"], self.dataset.padding_value
        )
        teachers = self._fit(
            "teacher", "teacher", model, self.train, self.seeds, self.teacher_keys, step
        )
        metadata |= {
            "params": teachers.params,
            "wall_time_s": teachers.wall_time_s,
            "examples_per_s": teachers.examples_per_s,
        }
        checkpoint.save_model(directory, teachers.frozen.variables, metadata)
        self.progress("teacher").delete_all()  # saved as a model: no optimizer state needed
        return teachers

    def scratch_students(self) -> Population:
        model = self._model("student")
        step = _with_shift(
            population_train_step, self.config["student"], self.dataset.padding_value
        )
        return self._fit(
            "student_scratch", "student", model, self.train, self.seeds, self.student_keys, step
        )

    def distilled_students(
        self,
        name: str,
        transfer: Split,
        teacher_logits: np.ndarray,
        temperatures: Sequence[float],
        member_seeds: Sequence[int],
        **model_overrides: Any,
    ) -> Population:
        """Students distilled on ``transfer`` from precomputed ``teacher_logits``
        (``[members, examples, classes]``), member ``m`` at ``temperatures[m]`` with the
        student key and batch order of ``member_seeds[m]``."""
        model = self._model("student", **model_overrides)
        index = [self.seeds.index(s) for s in member_seeds]
        temps = jnp.asarray(temperatures, jnp.float32)
        alphas = jnp.full_like(temps, float(self.config["student"]["alpha"]))

        def step(states, batch):
            return population_distill_from_logits_step(states, batch, temps, alphas)

        split = DeviceSplit(transfer, teacher_logits)
        keys = self.student_keys[np.asarray(index)]
        return self._fit(name, "student", model, split, member_seeds, keys, step)

    # --- evaluation -----------------------------------------------------------------------

    def logits(self, population: Population, split: DeviceSplit) -> np.ndarray:
        return predict_logits(
            population.frozen, split, self.config["eval_batch_size"], members=True
        )

    def errors_row(self, name: str, population: Population) -> dict[str, Any]:
        test_logits = self.logits(population, self.test)
        errors = scores.errors(test_logits, self.dataset.test.labels)
        return _row(name, errors, population, paper=PAPER.get(name))


def _saved_metadata(directory: str) -> dict[str, Any] | None:
    if not os.path.isfile(os.path.join(directory, checkpoint.METADATA)):
        return None
    return checkpoint.read_metadata(directory)


def _with_shift(population_step, stage: Mapping[str, Any], padding_value=None):
    options = augment_options(stage, padding_value)
    return lambda states, batch: population_step(states, batch, **options)


def _row(name: str, values: Sequence[float], population: Population | None, **extra) -> dict:
    mean, std = scores.mean_std(values)
    row = {"name": name, "mean": mean, "std": std, "per_seed": [float(v) for v in values]}
    if population is not None:
        row |= {
            "params": population.params,
            "wall_time_s": population.wall_time_s,
            "train_examples_per_s": population.examples_per_s,
        }
    return row | extra


# --- the parts ------------------------------------------------------------------------------


def table_part(job: Reproduction, teachers: Population, teacher_train_logits) -> list[dict]:
    temperature = float(job.config["student"]["temperature"])
    scratch = job.scratch_students()
    distilled = job.distilled_students(
        "student_distilled",
        job.dataset.train,
        teacher_train_logits,
        [temperature] * len(job.seeds),
        job.seeds,
    )
    return [
        job.errors_row("teacher", teachers),
        job.errors_row("student_scratch", scratch),
        job.errors_row("student_distilled", distilled),
    ]


def _transfer_split(job: Reproduction) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the transfer pool, indices of validation) in the training split."""
    num_validation = int(job.config["transfer"]["validation_examples"])
    return validation_indices(len(job.dataset.train), num_validation)


def _bias_shift_rows(
    job: Reproduction,
    name: str,
    students: Population,
    classes: Sequence[int],
    candidates: np.ndarray,
    paper_shift: float,
    validation_index: np.ndarray,
) -> list[dict]:
    """Test errors before and after shifting ``classes``' biases by the shift that is best on
    validation (chosen per seed), and at the paper's shift, with errors on those classes."""
    train = job.dataset.train
    validation = DeviceSplit(train.take(validation_index))
    val_logits = job.logits(students, validation)
    test_logits = job.logits(students, job.test)
    labels = job.dataset.test.labels
    on = np.isin(labels, classes)
    chosen = [
        scores.best_bias_shift(v, train.labels[validation_index], classes, candidates)[0]
        for v in val_logits
    ]
    shifted = np.stack(
        [scores.shift_bias(t, classes, s) for t, s in zip(test_logits, chosen, strict=True)]
    )
    at_paper = scores.shift_bias(test_logits, classes, paper_shift)
    rows = []
    for suffix, logits, shift in (
        ("before", test_logits, None),
        ("after", shifted, chosen),
        ("at_paper_shift", at_paper, [paper_shift] * len(chosen)),
    ):
        wrong = np.argmax(logits, -1) != labels
        rows.append(
            _row(
                f"{name}_{suffix}",
                wrong.sum(-1),
                students if suffix == "before" else None,
                errors_on_classes=[int(x) for x in (wrong & on).sum(-1)],
                class_examples=int(on.sum()),
                shift=None if shift is None else [float(s) for s in shift],
            )
        )
    return rows


def omitted_part(job: Reproduction, teacher_train_logits: np.ndarray) -> list[dict]:
    cfg = job.config["transfer"]
    omitted = int(cfg["omitted_class"])
    pool, validation = _transfer_split(job)
    keep = pool[job.dataset.train.labels[pool] != omitted]
    students = job.distilled_students(
        f"omitted_{omitted}",
        job.dataset.train.take(keep),
        teacher_train_logits[:, keep],
        [float(job.config["student"]["temperature"])] * len(job.seeds),
        job.seeds,
    )
    candidates = np.arange(0.0, cfg["max_shift"] + 1e-9, cfg["shift_step"])
    rows = _bias_shift_rows(
        job, "omitted", students, [omitted], candidates, cfg["paper_omitted_shift"], validation
    )
    for row in rows:
        row["paper"] = PAPER.get(row["name"])
        row["paper_on_class"] = PAPER.get(f"{row['name']}_on_class")
    return rows


def kept_part(job: Reproduction, teacher_train_logits: np.ndarray) -> list[dict]:
    cfg = job.config["transfer"]
    kept = [int(c) for c in cfg["kept_classes"]]
    pool, validation = _transfer_split(job)
    keep = pool[np.isin(job.dataset.train.labels[pool], kept)]
    students = job.distilled_students(
        "kept_" + "".join(map(str, kept)),
        job.dataset.train.take(keep),
        teacher_train_logits[:, keep],
        [float(job.config["student"]["temperature"])] * len(job.seeds),
        job.seeds,
    )
    candidates = -np.arange(0.0, cfg["max_shift"] + 1e-9, cfg["shift_step"])
    rows = _bias_shift_rows(
        job, "kept", students, kept, candidates, cfg["paper_kept_shift"], validation
    )
    test_size = len(job.dataset.test)
    for row in rows:  # the paper reports this experiment as % test error
        row["test_error_pct"] = [100.0 * e / test_size for e in row["per_seed"]]
        row["paper_pct"] = PAPER.get(f"{row['name']}_pct")
    return rows


def sweep_part(job: Reproduction, teacher_train_logits: np.ndarray) -> list[dict]:
    cfg = job.config["sweep"]
    temperatures = [float(t) for t in cfg["temperatures"]]
    member_temps = [t for t in temperatures for _ in job.seeds]
    member_seeds = [s for _ in temperatures for s in job.seeds]
    teacher_index = [job.seeds.index(s) for s in member_seeds]
    rows = []
    for hidden in cfg["hidden_sizes"]:
        width = "-".join(str(h) for h in hidden)
        students = job.distilled_students(
            f"sweep_{width}",
            job.dataset.train,
            teacher_train_logits[np.asarray(teacher_index)],
            member_temps,
            member_seeds,
            hidden_sizes=tuple(hidden),
        )
        test_logits = job.logits(students, job.test)
        errors = scores.errors(test_logits, job.dataset.test.labels).reshape(
            len(temperatures), len(job.seeds)
        )
        for t, per_seed in zip(temperatures, errors, strict=True):
            rows.append(
                _row(
                    f"sweep_{width}_T{t:g}",
                    per_seed,
                    None,
                    hidden_sizes=list(hidden),
                    temperature=t,
                    params=students.params,
                    wall_time_s_all_temperatures=students.wall_time_s,
                )
            )
    return rows


def run(config: Mapping[str, Any], workdir: str, dataset: Dataset) -> dict[str, Any]:
    """Runs ``config.parts`` in ``workdir`` on a loaded, checked ``dataset``; writes
    ``results.json`` and ``results.md`` there and returns the results."""
    start = time.perf_counter()
    commit = git_commit()  # at the start: the code that trains is the code the record names
    parts = _parts(config)
    job = Reproduction(config, dataset, workdir)
    teachers = job.teachers()
    results: dict[str, Any] = {"parts": {}, "part_wall_time_s": {}}
    if parts != ["teachers"]:
        teacher_train_logits = job.logits(teachers, job.train)
    part_fns = {
        "table": lambda: table_part(job, teachers, teacher_train_logits),
        "omitted": lambda: omitted_part(job, teacher_train_logits),
        "kept": lambda: kept_part(job, teacher_train_logits),
        "sweep": lambda: sweep_part(job, teacher_train_logits),
    }
    for part in parts:
        if part == "teachers":
            results["parts"]["teachers"] = [job.errors_row("teacher", teachers)]
            continue
        part_start = time.perf_counter()
        results["parts"][part] = part_fns[part]()
        results["part_wall_time_s"][part] = time.perf_counter() - part_start
    results["wall_time_s"] = time.perf_counter() - start
    results["commit"] = commit
    write_report(results, config, workdir, dataset, PAPER)
    # Finished: the students' resumable checkpoints (optimizer state included) are not needed.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "progress"), ignore_errors=True)
    return results


def _parts(config: Mapping[str, Any]) -> list[str]:
    parts = [p.strip() for p in str(config["parts"]).split(",") if p.strip()]
    allowed = ("teachers", *PARTS)
    for part in parts:
        if part not in allowed:
            raise ConfigError(
                f"parts: unknown part {part!r}; give a comma-separated list of "
                f"{', '.join(allowed)}."
            )
    if not parts:
        raise ConfigError(f"parts is empty: give a comma-separated list of {', '.join(allowed)}.")
    return parts


def validate(config: Mapping[str, Any]) -> None:
    """The checks of :func:`kdjax.config.validate_config`, plus this reproduction's own fields."""
    validate_config(config)
    _parts(config)
    transfer = config["transfer"]
    for field in ("max_shift", "shift_step"):
        if not isinstance(transfer[field], int | float) or transfer[field] <= 0:
            raise ConfigError(f"transfer.{field}={transfer[field]!r} must be a number > 0.")
    temperatures = list(config["sweep"]["temperatures"])
    if not temperatures or any(
        isinstance(t, bool) or not isinstance(t, int | float) for t in temperatures
    ):
        raise ConfigError(
            f"sweep.temperatures={temperatures!r} must be a non-empty list of numbers."
        )
    for temperature in temperatures:
        check_temperature(float(temperature), "sweep.temperatures")
    for hidden in config["sweep"]["hidden_sizes"]:
        build_model(
            {**config["student"]["model"], "hidden_sizes": tuple(hidden)},
            num_classes=10,
            field="sweep.hidden_sizes",
        )


def _check_classes(config: Mapping[str, Any], dataset: Dataset) -> None:
    transfer = config["transfer"]
    classes = [transfer["omitted_class"], *transfer["kept_classes"]]
    for cls in classes:
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < dataset.num_classes:
            raise ConfigError(
                f"transfer: class {cls!r} is not one of {dataset.name!r}'s classes "
                f"0-{dataset.num_classes - 1}: fix transfer.omitted_class / transfer.kept_classes."
            )
    validation_indices(len(dataset.train), int(transfer["validation_examples"]))


def reproduce(config: Mapping[str, Any], workdir: str, *, overwrite: bool = False) -> dict:
    """The ``hinton2015`` runner: checks everything, then :func:`run`."""
    validate(config)
    check_one_device_runner(config.get("parallel"), "hinton2015")
    check_performance(config, runner="hinton2015")
    # A finished reproduction is never replaced unless asked; an unfinished one of the same
    # config (its parts may differ) is continued in place: its teachers are reused and every
    # population resumes from its last checkpoint.
    resuming = workdirs.prepare(
        workdir, config, overwrite=overwrite, may_differ=("parts", "results_dir")
    )
    dataset = load_dataset(config["dataset"])
    check_config_fits_data(config, dataset)
    _check_classes(config, dataset)
    check_models_fit_data(
        {
            f"{role}.model": build_model(
                config[role]["model"], num_classes=dataset.num_classes, field=f"{role}.model"
            )
            for role in ("teacher", "student")
        },
        dataset,
    )
    workdirs.start(workdir, config, resuming=resuming)
    return run(config, workdir, dataset)
