"""Every config in experiments/ runs in smoke mode; the Hinton et al. (2015) runner end to end."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from conftest import REPO, raw_dir

from kdjax.errors import WorkdirError
from kdjax.runners import get_runner

EXPERIMENTS = sorted(p.name for p in (REPO / "experiments").glob("*.py"))
# Configs of other runners, each exercised by its own tests: the Hinton reproduction (here),
# the zoo (tests/test_zoo.py) and the CIFAR-100 tables (tests/test_cifar_configs.py).
OTHER_RUNNERS = (
    "hinton2015_mnist.py",
    "zoo_fashion_mnist.py",
    "cifar100_crd.py",
    "cifar100_dkd.py",
)


def _smoke_config(file_name, tfds_data_dir):
    spec = importlib.util.spec_from_file_location(file_name[:-3], REPO / "experiments" / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    if config.dataset.name != "digits":
        config.dataset.raw_dir = raw_dir(config.dataset.name)
        config.dataset.tfds_data_dir = tfds_data_dir
    return config


@pytest.fixture(scope="module")
def hinton_smoke(tfds_data_dir, tmp_path_factory):
    config = _smoke_config("hinton2015_mnist.py", tfds_data_dir)
    workdir = str(tmp_path_factory.mktemp("hinton2015"))
    return config, workdir, get_runner(config)(config, workdir)


def test_there_is_a_reproduction_config():
    assert "hinton2015_mnist.py" in EXPERIMENTS


def test_every_experiment_has_its_test():
    tested = {"hinton2015_mnist.py"} | {
        name
        for name in OTHER_RUNNERS
        if (REPO / "tests" / ("test_zoo.py" if "zoo" in name else "test_cifar_configs.py"))
        .read_text()
        .count(name[:-3])
    }
    assert set(OTHER_RUNNERS) == tested


# Fashion-MNIST's smoke run is MNIST's code path on other files (those are checked by
# test_data): kept in the slow suite, to keep the default run short.
_SLOW_SMOKE = ("fashion_mnist_short.py",)


@pytest.mark.parametrize(
    "file_name",
    [
        pytest.param(f, marks=pytest.mark.slow) if f in _SLOW_SMOKE else f
        for f in EXPERIMENTS
        if f not in OTHER_RUNNERS
    ],
)
def test_every_pipeline_experiment_runs_in_smoke_mode(file_name, tfds_data_dir, tmp_path):
    config = _smoke_config(file_name, tfds_data_dir)
    results = get_runner(config)(config, str(tmp_path))
    assert [r["stage"] for r in results["rows"]] == [
        "teacher",
        "student_scratch",
        "student_distilled",
    ]
    # One epoch is far above chance on any of these datasets; on MNIST every model learns.
    threshold = 0.95 if config.dataset.name == "mnist" else 0.5
    assert all(r["test_accuracy"] > threshold for r in results["rows"])
    assert (tmp_path / "results.md").is_file()


def test_hinton2015_smoke_reports_every_part_per_seed(hinton_smoke):
    config, workdir, results = hinton_smoke
    seeds = list(config.seeds)
    parts = results["parts"]
    assert list(parts) == ["table", "omitted", "kept", "sweep"]
    names = [r["name"] for r in parts["table"]]
    assert names == ["teacher", "student_scratch", "student_distilled"]
    for rows in parts.values():
        for row in rows:
            assert len(row["per_seed"]) == len(seeds)
            assert row["mean"] == pytest.approx(np.mean(row["per_seed"]))
    # Teachers of 64-64 units after one epoch: far better than chance, far from the paper.
    assert all(e < 3000 for e in parts["table"][0]["per_seed"])
    assert len(parts["sweep"]) == len(config.sweep.temperatures) * len(config.sweep.hidden_sizes)
    # Written for the record: config, seeds, commit, wall times, and the table with the paper.
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["seeds"] == seeds and saved["config"]["runner"] == "hinton2015"
    assert set(saved["part_wall_time_s"]) == set(parts) and saved["wall_time_s"] > 0
    assert "commit" in saved
    markdown = pathlib.Path(workdir, "results.md").read_text()
    assert "| teacher | 67 |" in markdown and "± " in markdown


def test_hinton2015_bias_shift_is_chosen_on_validation_and_helps_there(hinton_smoke):
    config, _, results = hinton_smoke
    rows = {r["name"]: r for r in results["parts"]["omitted"]}
    before, after = rows["omitted_before"], rows["omitted_after"]
    # A student that never saw a 3 gets nearly all test 3s wrong ...
    assert all(e > 0.9 * before["class_examples"] for e in before["errors_on_classes"])
    # ... and raising the class-3 bias, by a shift chosen per seed on validation, fixes many.
    assert all(s > 0 for s in after["shift"])
    assert all(
        a < b for a, b in zip(after["errors_on_classes"], before["errors_on_classes"], strict=True)
    )
    assert rows["omitted_at_paper_shift"]["shift"] == [3.5] * len(config.seeds)
    kept = {r["name"]: r for r in results["parts"]["kept"]}
    assert all(s <= 0 for s in kept["kept_after"]["shift"])
    np.testing.assert_allclose(
        kept["kept_before"]["test_error_pct"],
        [e / 100 for e in kept["kept_before"]["per_seed"]],
    )


def test_hinton2015_sweep_member_matches_the_table_student(hinton_smoke):
    """The sweep's T = 20 member of the student's own width is the table's distilled student
    (same key, batches and teacher), trained in a larger population."""
    config, _, results = hinton_smoke
    width = "-".join(str(h) for h in config.student.model.hidden_sizes)
    sweep = {r["name"]: r for r in results["parts"]["sweep"]}
    same = sweep[f"sweep_{width}_T20"]["per_seed"]
    table = results["parts"]["table"][2]["per_seed"]
    assert np.max(np.abs(np.subtract(same, table))) <= 3  # float32 reordering only


def test_hinton2015_never_replaces_a_finished_run_and_continues_an_unfinished_one(
    hinton_smoke, caplog
):
    config, workdir, results = hinton_smoke
    with pytest.raises(WorkdirError, match="already holds a finished kdjax run"):
        get_runner(config)(config, workdir)
    # An unfinished run (teachers saved, no results yet) continues and reuses its teachers.
    os.remove(os.path.join(workdir, "results.json"))
    config = config.copy_and_resolve_references()
    config.parts = "table"
    with caplog.at_level("INFO", logger="kdjax"):
        again = get_runner(config)(config, workdir)
    assert any("Reusing the teachers" in m for m in caplog.messages)
    assert again["parts"]["table"][0]["per_seed"] == results["parts"]["table"][0]["per_seed"]
    # Another config (other seeds) does not resume this run, nor reuse its teachers.
    os.remove(os.path.join(workdir, "results.json"))
    config.seeds = (5, 6)
    with pytest.raises(WorkdirError, match=r"unfinished run of another config \(seeds"):
        get_runner(config)(config, workdir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("parts", "table,distill", "unknown part 'distill'"),
        ("parts", " , ", "parts is empty"),
        ("seeds", (1, 1), "repeats a seed"),
        ("seeds", (), "must be a non-empty list"),
        ("transfer.omitted_class", 10, "not one of 'mnist'"),
        ("transfer.kept_classes", (7, -1), "not one of 'mnist'"),
        ("transfer.shift_step", 0, "must be a number > 0"),
        ("transfer.validation_examples", 60000, "must be between 1 and 59999"),
        ("sweep.temperatures", (4.0, 0.0), r"sweep.temperatures=0.0 must be in \[0.05, 100\]"),
        ("sweep.temperatures", (), "must be a non-empty list of numbers"),
        ("sweep.hidden_sizes", ((30, 0),), "whole numbers >= 1"),
        ("teacher.max_shift", -1, "must be a whole number >= 0"),
        ("teacher.optimizer.max_norm", -2.0, "must be >= 0"),
    ],
)
def test_hinton2015_bad_input_fails_before_any_work(field, value, message, tfds_data_dir, tmp_path):
    config = _smoke_config("hinton2015_mnist.py", tfds_data_dir)
    node = config
    *path, last = field.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    workdir = tmp_path / "run"
    with pytest.raises(Exception, match=message) as raised:
        get_runner(config)(config, str(workdir))
    assert type(raised.value).__name__ in ("ConfigError", "DataError")
    assert not workdir.exists()
