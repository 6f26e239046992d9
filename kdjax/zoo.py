"""The distiller zoo's table: one teacher population, then a student population per method,
every population a set of seeds trained side by side in one compiled program.

Rows (``runner = "zoo"``):

- ``teacher``: one teacher per seed (:mod:`kdjax.papers.hinton2015`'s teacher population);
- ``teacher_ensemble``: the seeds' teachers as one ensemble (averaged probabilities);
- ``student_scratch``: the student on hard labels alone;
- one row per entry of ``methods`` (``{row name: student.distiller section}``), student ``m``
  taught by teacher ``m``; with ``ensemble_method`` set, one more row taught by the ensemble of
  all teachers (:mod:`kdjax.distillers.kd`: averaged tempered probabilities);
- with ``assistant`` set, TAKD (Mirzadeh et al., 2020): a chain of teacher assistants, each
  distilled from the one before (the first from the teacher), then ``takd`` the student
  distilled from the last, every link with ``takd_method``. ``assistant`` is the assistants'
  training recipe and its model the only assistant; ``assistants`` (model configs, largest
  first) makes a longer chain, every link trained with that recipe.

Every student starts from the scratch student's initialisation and sees its batches, so the
rows differ only in what teaches them. The reporting rule is Hinton's: the last epoch's model,
evaluated once on the test set; every method runs at its published loss weights (or those the
config states), none tuned on the test set. Each population is checkpointed and resumes.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import scores
from kdjax import workdir as workdirs
from kdjax.config import (
    check_config_fits_data,
    check_models_fit_data,
    check_performance,
    validate_config,
)
from kdjax.data import Dataset, load_dataset
from kdjax.distillers import DistillerSpec, TrainingSet, build_distiller
from kdjax.errors import ConfigError
from kdjax.models import build_model
from kdjax.papers.hinton2015 import Population, Reproduction, _row
from kdjax.papers.report import git_commit, publish
from kdjax.train.loop import fit
from kdjax.train.method_step import init_distill_state, population_method_distill_step
from kdjax.train.optim import make_optimizer
from kdjax.train.parallel import check_one_device_runner
from kdjax.train.population import select_members
from kdjax.train.state import FrozenModel
from kdjax.train.steps import augment_options

logger = logging.getLogger(__name__)

RULE = (
    "Test errors of the model after its last epoch, evaluated once on the test set; mean ± std "
    "over seeds trained side by side (student m taught by teacher m). Loss weights are the "
    "methods' published ones unless the config says otherwise; nothing was tuned on the test set."
)


class ZooJob(Reproduction):
    """A :class:`~kdjax.papers.hinton2015.Reproduction` (teachers, scratch students, resumable
    populations) that trains students with any registered distiller."""

    def errors_row(self, name: str, population: Population) -> dict[str, Any]:
        errors = scores.errors(self.logits(population, self.test), self.dataset.test.labels)
        return _row(name, errors, population)

    def ensemble_row(self, teachers: Population) -> dict[str, Any]:
        """The teachers as one ensemble: the argmax of their averaged probabilities."""
        logits = self.logits(teachers, self.test)
        probs = jax.nn.softmax(jnp.asarray(logits), -1).mean(0)
        wrong = int(np.sum(np.argmax(np.asarray(probs), -1) != self.dataset.test.labels))
        return _row("teacher_ensemble", [wrong], None, params=teachers.params * len(self.seeds))

    def method_students(
        self,
        name: str,
        spec: DistillerSpec,
        teachers: tuple[FrozenModel, ...],
        *,
        role: str = "student",
        keys: jax.Array | None = None,
        model_config: Mapping[str, Any] | None = None,
    ) -> Population:
        """A population of ``role``'s model (or ``model_config``, trained with ``role``'s
        recipe) distilled with ``spec``: member ``m`` taught by member ``m`` of each of
        ``teachers`` (each a population)."""
        stage = self.config[role]
        if model_config is None:
            model = self._model(role)
        else:
            model = build_model(model_config, num_classes=self.num_classes, field=f"{role}s")
        keys = self.student_keys if keys is None else keys
        steps_per_epoch = self.train.steps_per_epoch(stage["batch_size"])
        tx = make_optimizer(
            stage["optimizer"],
            total_steps=steps_per_epoch * stage["epochs"],
            field=f"{role}.optimizer",
            steps_per_epoch=steps_per_epoch,
        )
        training_set = TrainingSet(
            len(self.dataset.train), self.dataset.train.labels, self.num_classes
        )
        example = np.asarray(self.train.images[:2])
        init = functools.partial(
            init_distill_state,
            model,
            tx,
            example_images=example,
            distiller=spec.distiller,
            training_set=training_set,
        )
        states = jax.jit(jax.vmap(lambda k, t: init(k, teacher=t)))(keys, teachers[0])
        weights = {k: jnp.float32(v) for k, v in spec.weights.items()}
        step = functools.partial(
            population_method_distill_step,
            teachers=teachers,
            weights=weights,
            distiller=spec.distiller,
            warmup_epochs=spec.warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            **augment_options(stage, self.dataset.padding_value),
        )
        result = fit(
            states,
            self.train,
            step,
            epochs=stage["epochs"],
            batch_size=stage["batch_size"],
            seed=self.seeds,
            **self.fit_options(name),
        )
        return Population.of(result)


def assistant_chain(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The TAKD assistants' model configs, largest first (none without ``assistant``)."""
    if not config.get("assistant"):
        return []
    return [dict(m) for m in config.get("assistants", None) or [config["assistant"]["model"]]]


def _methods(config: Mapping[str, Any]) -> dict[str, DistillerSpec]:
    """Every distiller the config names, built (and so checked) before any work."""
    specs = {
        name: build_distiller(section, field=f"methods.{name}")
        for name, section in config["methods"].items()
    }
    for key in ("ensemble_method", "takd_method"):
        if config.get(key):
            specs[key] = build_distiller(config[key], field=key)
    if "ensemble_method" in specs and specs["ensemble_method"].distiller.feature_based:
        raise ConfigError(
            "ensemble_method: an ensemble has no single set of features; use a method on "
            "logits (kd or dkd)."
        )
    return specs


def run(config: Mapping[str, Any], workdir: str, dataset: Dataset) -> dict[str, Any]:
    start = time.perf_counter()
    commit = git_commit()
    specs = _methods(config)
    job = ZooJob(config, dataset, workdir)
    rows, wall = [], {}

    def timed(name: str, make):
        part_start = time.perf_counter()
        value = make()
        wall[name] = time.perf_counter() - part_start
        return value

    teachers = timed("teacher", job.teachers)
    rows.append(job.errors_row("teacher", teachers))
    if config.get("ensemble_method"):
        rows.append(job.ensemble_row(teachers))
    scratch = timed("student_scratch", job.scratch_students)
    rows.append(job.errors_row("student_scratch", scratch))
    for name in config["methods"]:
        students = timed(name, lambda n=name: job.method_students(n, specs[n], (teachers.frozen,)))
        rows.append(job.errors_row(name, students) | {"method": dict(config["methods"][name])})
    if config.get("ensemble_method"):
        # Every student is taught by every teacher: K copies of the population, member k
        # everywhere in the k-th.
        members = len(job.seeds)
        ensemble = tuple(select_members(teachers.frozen, [k] * members) for k in range(members))
        students = timed(
            "ensemble", lambda: job.method_students("ensemble", specs["ensemble_method"], ensemble)
        )
        rows.append(job.errors_row("ensemble", students) | {"teachers": members})
    chain = assistant_chain(config)
    teaching = teachers
    for link, model_config in enumerate(chain, start=1):
        name = "assistant" if len(chain) == 1 else f"assistant{link}"
        # Each link's own initialisation, derived from the student's key of the same seed.
        keys = jax.vmap(lambda k, link=link: jax.random.fold_in(k, link))(job.student_keys)
        teaching = timed(
            name,
            lambda name=name, model_config=model_config, teaching=teaching, keys=keys: (
                job.method_students(
                    name,
                    specs["takd_method"],
                    (teaching.frozen,),
                    role="assistant",
                    keys=keys,
                    model_config=model_config,
                )
            ),
        )
        rows.append(job.errors_row(name, teaching))
    if chain:
        students = timed(
            "takd", lambda: job.method_students("takd", specs["takd_method"], (teaching.frozen,))
        )
        rows.append(job.errors_row("takd", students))
    published = dict(config.get("published", None) or {})
    for row in rows:
        if row["name"] in published:
            row["paper_top1_pct"] = float(published[row["name"]])
    results = {
        "name": config.get("name", "zoo"),
        "rule": RULE,
        "rows": rows,
        "part_wall_time_s": wall,
        "wall_time_s": time.perf_counter() - start,
        "commit": commit,
    }
    publish(results, zoo_markdown, config, workdir, dataset)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "progress"), ignore_errors=True)
    return results


def zoo_markdown(results: Mapping[str, Any]) -> str:
    test_examples = results["dataset"]["test_examples"]
    scratch = next((r for r in results["rows"] if r["name"] == "student_scratch"), None)
    with_paper = any("paper_top1_pct" in row for row in results["rows"])
    lines = [
        f"# {results['name']}",
        "",
        results["rule"],
        "",
        "| row | test errors, mean ± std (per seed) | test accuracy % "
        + ("| paper top-1 % " if with_paper else "")
        + "| vs scratch | params | wall time (s) | train examples/s |",
        "|---|---|---|---|---|---|---|" + ("---|" if with_paper else ""),
    ]
    for row in results["rows"]:
        mean, std = row["mean"], row["std"]
        seeds = ", ".join(f"{v:.0f}" for v in row["per_seed"])
        accuracy = 100.0 * (1.0 - mean / test_examples)
        versus = "–" if scratch is None or row is scratch else f"{mean - scratch['mean']:+.1f}"
        speed = row.get("train_examples_per_s")
        lines.append(
            f"| {row['name']} | {mean:.1f} ± {std:.1f} ({seeds}) | {accuracy:.2f} "
            + (f"| {row.get('paper_top1_pct', '–')} " if with_paper else "")
            + f"| {versus} "
            f"| {row.get('params', 0):,} | {_seconds(row.get('wall_time_s'))} "
            f"| {'–' if speed is None else f'{speed:,.0f}'} |"
        )
    lines += [
        "",
        f"Seeds {results['seeds']}; total wall time {results['wall_time_s']:.0f} s on "
        f"{results['platform']}; commit {results['commit']}.",
        "",
    ]
    return "\n".join(lines)


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{value:.0f}"


def validate(config: Mapping[str, Any]) -> None:
    validate_config(config)
    if not config.get("methods"):
        raise ConfigError(
            "methods is empty: name at least one distiller, e.g. {'kd': {'name': 'kd'}}."
        )
    specs = _methods(config)
    reserved = {"teacher", "teacher_ensemble", "student_scratch", "ensemble", "takd"}
    for name in config["methods"]:
        if name in reserved or name.startswith("assistant"):
            raise ConfigError(
                f"methods.{name}: {name!r} names one of the table's own rows; call it otherwise."
            )
    for link, model_config in enumerate(assistant_chain(config)):
        build_model(model_config, num_classes=1, field=f"assistants[{link}]")
    if config.get("assistant") and "takd_method" not in specs:
        raise ConfigError(
            "assistant is set but takd_method is not: give the distiller of both TAKD stages."
        )


def reproduce(config: Mapping[str, Any], workdir: str, *, overwrite: bool = False) -> dict:
    """The ``zoo`` runner: checks everything (config, methods, data, models), then :func:`run`."""
    validate(config)
    check_one_device_runner(config.get("parallel"), "zoo")
    check_performance(config, runner="zoo")
    resuming = workdirs.prepare(workdir, config, overwrite=overwrite, may_differ=("results_dir",))
    dataset = load_dataset(config["dataset"])
    check_config_fits_data(config, dataset)
    models = {
        f"{role}.model": build_model(
            config[role]["model"], num_classes=dataset.num_classes, field=f"{role}.model"
        )
        for role in ("teacher", "student")
    }
    for link, model_config in enumerate(assistant_chain(config)):
        models[f"assistants[{link}]"] = build_model(
            model_config, num_classes=dataset.num_classes, field=f"assistants[{link}]"
        )
    check_models_fit_data(models, dataset)
    workdirs.start(workdir, config, resuming=resuming)
    return run(config, workdir, dataset)
