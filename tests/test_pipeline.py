"""The whole job end to end, on digits and on real MNIST, and every bad input it refuses."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from kdjax.configs import default
from kdjax.errors import ConfigError, DataError, WorkdirError
from kdjax.pipeline import run
from kdjax.runners import get_runner


def _digits_config(epochs=12):
    config = default.get_config()
    config.teacher.epochs = config.student.epochs = epochs
    return config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    return workdir, run(_digits_config(), workdir)


def test_digits_run_writes_results_and_checkpoints(digits_run):
    workdir, results = digits_run
    assert [r["stage"] for r in results["rows"]] == [
        "teacher",
        "student_scratch",
        "student_distilled",
    ]
    by_stage = {r["stage"]: r for r in results["rows"]}
    assert by_stage["teacher"]["test_accuracy"] > 0.95
    assert by_stage["student_distilled"]["test_accuracy"] > 0.9
    assert by_stage["teacher"]["params"] == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    for row in results["rows"]:
        assert row["test_errors"] == round((1 - row["test_accuracy"]) * 360)
        assert row["train_examples_per_s"] > 0
        assert os.path.isfile(os.path.join(workdir, "checkpoints", row["stage"], "model.json"))
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["rows"] == results["rows"]
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert "| student_distilled |" in table and "test errors" in table
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 * 12
    assert {"soft_kl", "hard_ce", "teacher_agreement"} <= set(records[-1])


def test_a_second_run_never_overwrites_the_first(digits_run):
    workdir, _ = digits_run
    before = {
        name: os.path.getmtime(os.path.join(workdir, name))
        for name in ("results.json", "results.md", "config.json")
    }
    with pytest.raises(WorkdirError, match="already holds a finished kdjax run.*--overwrite"):
        run(_digits_config(), workdir)
    after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
    assert before == after


def test_overwrite_replaces_the_run(tmp_path):
    config = _digits_config(epochs=1)
    run(config, str(tmp_path))
    (tmp_path / "results.md").write_text("stale")
    run(config, str(tmp_path), overwrite=True)
    assert "stale" not in (tmp_path / "results.md").read_text()


def test_teacher_checkpoint_is_reused_not_retrained(digits_run, tmp_path):
    workdir, first = digits_run
    config = _digits_config(epochs=2)
    config.teacher.checkpoint = workdir
    results = run(config, str(tmp_path))
    teacher = results["rows"][0]
    assert teacher["stage"] == "teacher (reused)" and teacher["epochs"] == 0
    assert teacher["test_errors"] == first["rows"][0]["test_errors"]
    assert teacher["test_loss"] == pytest.approx(first["rows"][0]["test_loss"], rel=1e-6)
    assert not os.path.exists(tmp_path / "checkpoints" / "teacher")


def test_teacher_checkpoint_of_another_architecture_is_refused(digits_run, tmp_path):
    workdir, _ = digits_run
    config = _digits_config(epochs=1)
    config.teacher.checkpoint = workdir
    config.teacher.model.hidden_sizes = (256, 256)
    with pytest.raises(ConfigError, match="teacher.checkpoint .* holds mlp.*teacher.model is"):
        run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("teacher.model.name", "resnet9000", ConfigError, r"teacher.model.name: unknown model"),
        ("student.model.name", "mpl", ConfigError, r"student.model.name.*Did you mean 'mlp'"),
        ("dataset.name", "cifar", ConfigError, r"dataset.name: unknown dataset 'cifar'"),
        (
            "student.temperature",
            0.0,
            ConfigError,
            r"student.temperature=0.0 must be in \[0.05, 100\]",
        ),
        (
            "student.temperature",
            -2.0,
            ConfigError,
            r"student.temperature=-2.0 must be in \[0.05, 100\]",
        ),
        ("student.temperature", 1e30, ConfigError, r"temperature=1e\+30 must be in \[0.05, 100"),
        ("student.alpha", 1.5, ConfigError, r"student.alpha=1.5 must be in \[0, 1\]"),
        ("student.alpha", -0.1, ConfigError, r"student.alpha=-0.1 must be in \[0, 1\]"),
        ("student.batch_size", 0, ConfigError, r"student.batch_size=0 must be a whole number"),
        ("student.batch_size", 5000, ConfigError, r"student.batch_size=5000 is larger than"),
        ("teacher.optimizer.name", "adamm", ConfigError, r"Did you mean 'adam'"),
        ("teacher.checkpoint", "/no/such/run", ConfigError, r"teacher.checkpoint=.*does not exist"),
        ("seed", -1, ConfigError, r"seed=-1 must be a whole number >= 0"),
        ("teacher.optimizer.learning_rate", 0.0, ConfigError, r"learning_rate=0.0 must be > 0"),
        ("student.optimizer.momentum", -0.1, ConfigError, r"momentum=-0.1 must be in \[0, 1\)"),
        ("student.optimizer.momentum", 1.0, ConfigError, r"momentum=1.0 must be in \[0, 1\)"),
        ("teacher.optimizer.weight_decay", float("nan"), ConfigError, r"must be a finite number"),
        ("student.optimizer.warmup_steps", -5, ConfigError, r"warmup_steps=-5 must be a whole"),
        ("teacher.model.dropout_rate", 1.0, ConfigError, r"dropout_rate=1.0 must be in \[0, 1\)"),
        ("student.model.hidden_sizes", (0,), ConfigError, r"hidden_sizes=\(0,\) must hold whole"),
        ("teacher.max_shift", -2, ConfigError, r"teacher.max_shift=-2 must be a whole number"),
        ("student.optimizer.max_norm", -1.0, ConfigError, r"max_norm=-1.0 must be >= 0"),
        ("dataset.validation_examples", -3, ConfigError, r"validation_examples=-3 must be"),
        ("seeds", (0, 1), ConfigError, r"the pipeline runner trains one seed"),
        ("on_nonfinite", "ignore", ConfigError, r"on_nonfinite='ignore' must be one of stop"),
        ("checkpointing.every_steps", -1, ConfigError, r"every_steps=-1 must be a whole number"),
        ("checkpointing.max_to_keep", 0, ConfigError, r"max_to_keep=0 must be a whole number"),
        ("checkpointing.every_seconds", -1.0, ConfigError, r"every_seconds=-1.0 must be >= 0"),
        ("runner", "hinton2016", ConfigError, r"runner: unknown runner.*Did you mean 'hinton2015'"),
        (
            "dataset.raw_dir",
            "/no/such/dir",
            None,
            r"dataset.raw_dir='/no/such/dir' is not a folder",
        ),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, field, value, error, message):
    config = _digits_config(epochs=1)
    if field == "dataset.raw_dir":
        config.dataset.name = "mnist"
        error = DataError
    *sections, key = field.split(".")
    node = config
    for part in sections:
        node = node[part]
    node[key] = value
    with pytest.raises(error, match=message):
        get_runner(config)(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_teacher_and_student_with_different_classes_are_refused(tmp_path):
    config = _digits_config(epochs=1)
    config.teacher.model.num_classes = 10
    config.student.model.num_classes = 5
    with pytest.raises(ConfigError, match=r"teacher.model.num_classes=10 but student.model"):
        run(config, str(tmp_path / "w"))
    config.student.model.num_classes = 100
    config.teacher.model.num_classes = 100
    with pytest.raises(
        ConfigError, match=r"student.model.num_classes=100|teacher.model.num_classes=100"
    ):
        run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_a_model_that_pools_the_images_away_is_refused(tmp_path):
    config = _digits_config(epochs=1)
    # 8x8 digits: 4 -> 2 -> 1 -> nothing after the fourth 2x2 pooling.
    config.teacher.model = {"name": "cnn", "channels": (8, 8, 8, 8), "batch_norm": False}
    with pytest.raises(
        ConfigError,
        match=r"teacher.model cannot take 'digits' images of shape \(8, 8, 1\): its 4 stages .* "
        r"after stage 4: use at most 3 channels entries",
    ):
        run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_skipped_non_finite_steps_are_reported_not_hidden(tmp_path):
    config = _digits_config(epochs=2)
    config.teacher.optimizer.learning_rate = 1e6  # diverges within a few steps
    config.on_nonfinite = "skip"
    results = run(config, str(tmp_path))
    teacher, scratch, _ = results["rows"]
    assert 0 < teacher["skipped_steps"] <= 2 * 22 and "skipped_steps" not in scratch
    assert "skipped non-finite steps" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "metrics.jsonl") as f:
        teacher_epochs = [json.loads(line) for line in f][:2]
    assert sum(r["nonfinite_steps"] for r in teacher_epochs) == teacher["skipped_steps"]


def _kdjax(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kdjax", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_cli_runs_the_smoke_config_and_prints_the_table(tmp_path):
    done = _kdjax(
        f"--config={REPO}/experiments/digits_cnn.py:smoke",
        f"--workdir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "| student_distilled |" in done.stdout
    assert (
        json.loads((tmp_path / "run" / "config.json").read_text())["teacher"]["model"]["name"]
        == "cnn"
    )


def test_cli_bad_input_exits_non_zero_with_a_message(tmp_path):
    done = _kdjax("--config.student.temperature=0", f"--workdir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 2
    assert "kdjax: error: student.temperature=0.0 must be in [0.05, 100]" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.student.temprature=3"], 'Did you mean "temperature"'),
        (["--config.student.alpha=abc"], "could not convert string to float"),
        (["stray"], "unexpected arguments: stray"),
        (["--config.foo=1"], "--config.foo: the config has no field 'foo'"),
        (
            ["--config.student.temprature=3"],
            "--config.student.temprature: the config has no field 'temprature'. Did you mean",
        ),
        (["--config=no/such.py:smoke"], "--config=no/such.py:smoke: there is no file no/such.py"),
        ([f"--config={REPO}/experiments/mnist_short.py:smokey"], "unknown variant 'smokey'"),
        (["--workdir="], "--workdir is empty"),
    ],
)
def test_cli_parse_errors_are_one_line(tmp_path, args, message):
    workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}/run"]
    done = _kdjax(*args, *workdir, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("kdjax: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mnist_short_teacher_makes_at_most_200_errors(mnist_config, tmp_path):
    from kdjax.configs import hinton_mlp

    config = hinton_mlp.get_config()
    config.dataset.update(mnist_config)
    results = run(config, str(tmp_path))
    by_stage = {r["stage"]: r for r in results["rows"]}
    assert by_stage["teacher"]["test_errors"] <= 200
    assert by_stage["student_distilled"]["test_accuracy"] > 0.97


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(WorkdirError, match=r"is a file, not a folder"):
        run(_digits_config(epochs=1), str(path))
    with pytest.raises(WorkdirError, match=r"is not a writable folder"):
        run(_digits_config(epochs=1), str(path / "run"))
    assert path.read_text() == "keep me"
    # /proc passes a permission check (as root too) but no folder can be made in it.
    with pytest.raises(WorkdirError, match=r"--workdir /proc/kdjax-run cannot be made"):
        run(_digits_config(epochs=1), "/proc/kdjax-run")


def test_jittered_teacher_and_validation_split_in_the_pipeline(tmp_path):
    config = _digits_config(epochs=12)
    config.teacher.max_shift = 1
    config.dataset.validation_examples = 200
    results = run(config, str(tmp_path))
    assert results["dataset"]["train_examples"] == 1437 - 200
    for row in results["rows"]:
        assert row["validation_errors"] == round((1 - row["validation_accuracy"]) * 200)
        # Measured: 0.865-0.93 (a 1-pixel jitter is a large change to an 8x8 digit).
        assert row["validation_accuracy"] > 0.8
    assert "validation accuracy" in (tmp_path / "results.md").read_text()
