"""Speed features change speed only: steps per dispatch, mixed precision, the teacher-logit
cache and one teacher pass for many students. Each is checked against the plain path."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import pipeline
from kdjax.config import performance_config
from kdjax.configs import default as default_config
from kdjax.data import DeviceSplit
from kdjax.errors import ConfigError, Interrupted, NonFiniteError
from kdjax.models import build_model, init_variables
from kdjax.train import (
    create_train_state,
    distill_step,
    fit,
    make_optimizer,
    preemption,
    teacher_cache,
    train_step,
)
from kdjax.train import loop as loop_module
from kdjax.train.parallel import DataParallel
from kdjax.train.population import init_population, shared_teacher_distill_step
from kdjax.train.resume import TrainCheckpoints
from kdjax.train.steps import distill_from_logits_step, forward_train
from kdjax.train.teacher_cache import CACHE_FILE, compute_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, BATCH = 2, 64  # digits: 1,437 training examples, 22 steps an epoch


def _model(hidden=(48,), dropout=0.3):
    config = {"name": "mlp", "hidden_sizes": hidden, "dropout_rate": dropout}
    return build_model(config, num_classes=10, field="student.model")


def _state(digits, model=None, precision="float32", key=4):
    model = model or _model()
    config = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "schedule": "cosine"}
    tx = make_optimizer(config, total_steps=EPOCHS * 22, field="student.optimizer")
    variables = init_variables(model, jax.random.key(key), digits.train.images[:1])
    return create_train_state(model, variables, tx, jax.random.key(key + 1), precision)


def _teacher(digits):
    return _state(digits, _model((64,), 0.0), key=9).frozen()


def _distill(teacher):
    return functools.partial(
        distill_step,
        teacher=teacher,
        temperature=jnp.float32(4.0),
        alpha=jnp.float32(0.9),
        max_shift=1,
    )


def _max_difference(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


@pytest.fixture(autouse=True)
def _no_stale_signal():
    preemption._requested.clear()
    yield
    preemption._requested.clear()


# --- steps per dispatch -------------------------------------------------------------------


@pytest.mark.parametrize("steps_per_dispatch", [4, 22])
def test_several_steps_per_dispatch_train_the_same_model(digits, steps_per_dispatch):
    """Dropout, jitter and a teacher; 22 steps an epoch, so 4 leaves a short last chunk."""
    split, step = DeviceSplit(digits.train), _distill(_teacher(digits))
    one = fit(_state(digits), split, step, epochs=EPOCHS, batch_size=BATCH, seed=3)
    many = fit(
        _state(digits),
        split,
        step,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=3,
        steps_per_dispatch=steps_per_dispatch,
    )
    assert int(many.state.step) == EPOCHS * 22
    # The same steps in one compiled loop: only XLA's fusion choices differ (float rounding).
    assert _max_difference(one.state.params, many.state.params) < 1e-6
    assert _max_difference(one.state.opt_state, many.state.opt_state) < 1e-6
    for a, b in zip(one.history, many.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)


def test_a_population_runs_several_steps_per_dispatch(digits):
    from kdjax.train.population import member_keys, population_train_step

    split = DeviceSplit(digits.train)
    model = _model()
    config = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    tx = make_optimizer(config, total_steps=EPOCHS * 22, field="student.optimizer")

    def states():
        return init_population(model, tx, member_keys([1, 2]), digits.train.images[:1])

    runs = [
        fit(
            states(),
            split,
            population_train_step,
            epochs=1,
            batch_size=BATCH,
            seed=[1, 2],
            steps_per_dispatch=k,
        )
        for k in (1, 8)
    ]
    assert _max_difference(runs[0].state.params, runs[1].state.params) < 1e-6
    assert np.asarray(runs[1].history[0]["loss"]).shape == (2,)


def test_an_interrupted_multi_step_fit_resumes_to_the_uninterrupted_model(
    digits, tmp_path, monkeypatch
):
    """Stopped after the 3rd dispatch (step 12 of 44), with saves due every 5 steps (which no
    dispatch of 4 ends on: a save falls due when a dispatch passes a multiple)."""
    split, step = DeviceSplit(digits.train), functools.partial(train_step, max_shift=1)

    def run(checkpoints=None):
        return fit(
            _state(digits),
            split,
            step,
            epochs=EPOCHS,
            batch_size=BATCH,
            seed=0,
            checkpoints=checkpoints,
            steps_per_dispatch=4,
        )

    uninterrupted = run()
    real, calls = loop_module._chunk_steps, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 3:
            preemption._requested.append(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(loop_module, "_chunk_steps", interrupting)
    directory = str(tmp_path / "ckpt")
    checkpoints = TrainCheckpoints(directory, every_steps=5)
    with pytest.raises(Interrupted, match="checkpoint saved at step 12"):
        run(checkpoints)
    assert checkpoints.verified_steps() == [8, 12]  # 8: the dispatch that passed step 5
    monkeypatch.setattr(loop_module, "_chunk_steps", real)
    preemption._requested.clear()
    resumed = run(TrainCheckpoints(directory, every_steps=5))
    # Resumed at step 12: its chunks (12-15, ...) are the uninterrupted run's.
    assert _max_difference(uninterrupted.state.params, resumed.state.params) == 0.0
    assert resumed.history == uninterrupted.history


@pytest.mark.parametrize("steps_per_dispatch", [1, 4])
def test_a_nan_inside_a_dispatch_is_named_with_its_own_step(digits, steps_per_dispatch):
    logits = compute_logits(_teacher(digits), DeviceSplit(digits.train), 500, DataParallel())
    split = DeviceSplit(digits.train, logits)

    def poisoned(state, batch):  # the teacher's logits go NaN at the 27th step (state.step 26)
        bad = batch["teacher_logits"].at[3, 0].set(jnp.nan)
        batch = dict(
            batch, teacher_logits=jnp.where(state.step == 26, bad, batch["teacher_logits"])
        )
        return distill_from_logits_step(state, batch, jnp.float32(4.0), jnp.float32(0.5))

    with pytest.raises(NonFiniteError, match=r"^kd: non-finite soft_kl, loss at step 27"):
        fit(
            _state(digits),
            split,
            poisoned,
            epochs=EPOCHS,
            batch_size=BATCH,
            seed=0,
            name="kd",
            steps_per_dispatch=steps_per_dispatch,
        )


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_steps_per_dispatch_is_refused_before_training(digits, value):
    with pytest.raises(ConfigError, match="steps_per_dispatch"):
        fit(
            _state(digits),
            DeviceSplit(digits.train),
            train_step,
            epochs=1,
            batch_size=BATCH,
            seed=0,
            steps_per_dispatch=value,
        )


# --- one teacher pass for many students ----------------------------------------------------


@pytest.mark.parametrize("loop", ["vmap", "unroll", "map"])
def test_students_sharing_a_teacher_pass_each_get_their_own_distill_step(digits, loop):
    teacher, model = _teacher(digits), _model(dropout=0.2)
    config = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    tx = make_optimizer(config, total_steps=10, field="student.optimizer")
    keys = jax.random.split(jax.random.key(0), 3)
    states = init_population(model, tx, keys, digits.train.images[:1])
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    temperatures, alphas = jnp.array([1.0, 4.0, 20.0]), jnp.array([0.5, 0.9, 1.0])
    together, metrics = shared_teacher_distill_step(
        states, batch, teacher, temperatures, alphas, loop=loop
    )
    states = init_population(model, tx, keys, digits.train.images[:1])  # the first was donated
    for m in range(3):
        alone = jax.tree_util.tree_map(lambda x, m=m: x[m], states)
        alone, alone_metrics = distill_step(alone, batch, teacher, temperatures[m], alphas[m])
        member = jax.tree_util.tree_map(lambda x, m=m: x[m], together)
        assert _max_difference(alone.params, member.params) < 1e-6
        assert float(metrics["loss"][m]) == pytest.approx(float(alone_metrics["loss"]), rel=1e-5)


# --- mixed precision -----------------------------------------------------------------------


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(digits):
    model = build_model(
        {"name": "cnn", "channels": (8, 16), "dense_size": 32},
        num_classes=10,
        field="student.model",
    )  # batch norm included
    state = _state(digits, model, precision="bfloat16")
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    (logits, _), batch_stats = forward_train(
        state, state.params, batch["image"], batch["mask"], jax.random.key(0)
    )
    assert logits.dtype == jnp.bfloat16
    assert state.frozen()(batch["image"])[0].dtype == jnp.bfloat16
    state, metrics = train_step(state, batch)
    for tree in (state.params, state.opt_state, state.batch_stats, batch_stats):
        assert {x.dtype for x in jax.tree_util.tree_leaves(tree) if x.ndim} == {
            jnp.dtype("float32")
        }
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    # float32 (the default) leaves the arithmetic alone.
    assert _state(digits, model).frozen()(batch["image"])[0].dtype == jnp.float32


def test_bfloat16_training_lands_within_tolerance_of_float32(digits):
    """The digits student, distilled 2 epochs in each precision: same accuracy to within
    1.5 points, parameters within 0.05 (bfloat16 keeps 8 bits of mantissa)."""
    from kdjax.train import evaluate

    split, test = DeviceSplit(digits.train), DeviceSplit(digits.test)
    teacher_state = _state(digits, _model((64,), 0.0), key=9)
    teacher = fit(teacher_state, split, train_step, epochs=EPOCHS, batch_size=BATCH, seed=1)
    teacher = teacher.state.frozen()
    results = {}
    for precision in ("float32", "bfloat16"):
        step = functools.partial(
            distill_step,
            teacher=teacher.replace(precision=precision),
            temperature=jnp.float32(4.0),
            alpha=jnp.float32(0.5),
        )
        result = fit(
            _state(digits, precision=precision),
            split,
            step,
            epochs=EPOCHS,
            batch_size=BATCH,
            seed=0,
        )
        results[precision] = (result.state, evaluate(result.state.frozen(), test, 512))
    (f32, f32_scores), (bf16, bf16_scores) = results["float32"], results["bfloat16"]
    assert abs(f32_scores["accuracy"] - bf16_scores["accuracy"]) <= 0.015
    assert _max_difference(f32.params, bf16.params) < 0.05
    assert f32_scores["accuracy"] > 0.65  # 2 epochs from a 2-epoch teacher: 0.725 here


def test_an_unknown_precision_is_refused(tmp_path):
    config = default_config.get_config("smoke")
    config.performance.precision = "float16"
    with pytest.raises(ConfigError, match=r"performance.precision='float16' must be one of"):
        pipeline.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --- teacher-logit cache -------------------------------------------------------------------


def test_cached_logits_are_keyed_by_example_index(digits):
    teacher, split = _teacher(digits), DeviceSplit(digits.train)
    logits = compute_logits(teacher, split, 100, DataParallel())  # 100 does not divide 1,437
    assert logits.shape == (len(digits.train), 10)
    rows = np.array([1436, 0, 700, 5])
    direct = np.asarray(teacher(jnp.asarray(digits.train.images[rows]))[0])
    np.testing.assert_allclose(logits[rows], direct, rtol=1e-5, atol=1e-5)
    # A training batch (shuffled) carries the rows of its own examples.
    batch = next(DeviceSplit(digits.train, logits).train_batches(BATCH, seed=7, epoch=3))
    np.testing.assert_array_equal(
        np.asarray(batch["teacher_logits"]), logits[np.asarray(batch["index"])]
    )


def _cached_config(**student):
    config = default_config.get_config("smoke")
    config.performance.teacher_cache = True
    config.student.update(student)
    return config


def test_the_teacher_cache_distills_the_same_student_and_is_reused(tmp_path, monkeypatch):
    plain = pipeline.run(default_config.get_config("smoke"), str(tmp_path / "plain"))
    calls, real = [], teacher_cache.compute_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "compute_logits", counting)
    cached = pipeline.run(_cached_config(), str(tmp_path / "cached"))
    assert calls == [1]
    assert (tmp_path / "cached" / "checkpoints" / "teacher" / CACHE_FILE).is_file()
    rows = {r["stage"]: r for r in plain["rows"]}
    for row in cached["rows"]:
        expected = rows[row["stage"]]
        assert row["test_errors"] == expected["test_errors"]
        assert row["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-4)
    # Another student of the same teacher, at another temperature: the cache is read, not
    # recomputed, from the teacher's run.
    config = _cached_config(temperature=2.0)
    config.teacher.checkpoint = str(tmp_path / "cached")
    pipeline.run(config, str(tmp_path / "other"))
    assert calls == [1]
    # A cache for other data (here: a corrupt fingerprint) is recomputed, never used.
    path = tmp_path / "cached" / "checkpoints" / "teacher" / CACHE_FILE
    with np.load(path) as saved:
        np.savez(path, logits=saved["logits"] + 1.0, fingerprint=np.array("0" * 64))
    pipeline.run(config, str(tmp_path / "third"))
    assert calls == [1, 1]


@pytest.mark.parametrize("field", ["max_shift", "crop_flip_pad"])
def test_the_teacher_cache_is_refused_for_augmented_students(tmp_path, field):
    with pytest.raises(ConfigError, match=rf"teacher_cache=true with student.{field}=2"):
        pipeline.run(_cached_config(**{field: 2}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_performance_fields_are_checked_before_any_work(tmp_path):
    config = default_config.get_config("smoke")
    config.performance.steps_per_dispatch = 0
    with pytest.raises(ConfigError, match=r"performance.steps_per_dispatch=0 must be"):
        pipeline.run(config, str(tmp_path / "run"))
    config = default_config.get_config("smoke")
    with config.ignore_type():  # as a config file could write it
        config.performance.teacher_cache = "yes"
    with pytest.raises(ConfigError, match=r"teacher_cache='yes' must be true or false"):
        pipeline.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert set(performance_config()) == {"steps_per_dispatch", "precision", "teacher_cache"}


@pytest.mark.slow
def test_the_pipeline_with_every_speed_option_matches_the_plain_run(tmp_path):
    """steps_per_dispatch=8 and the teacher cache (float32): the same errors as a plain run."""
    plain = pipeline.run(default_config.get_config("smoke"), str(tmp_path / "plain"))
    config = _cached_config()
    config.performance.steps_per_dispatch = 8
    fast = pipeline.run(config, str(tmp_path / "fast"))
    assert [r["test_errors"] for r in fast["rows"]] == [r["test_errors"] for r in plain["rows"]]


@pytest.mark.slow
def test_bfloat16_mnist_short_run_lands_within_tolerance_of_float32(mnist_config, tmp_path):
    """The README's stated tolerance: every stage of the MNIST short run in bfloat16 within
    0.3 points (30 test errors of 10,000) of the float32 run (measured: 2-14 errors apart)."""
    from kdjax.configs import hinton_mlp

    errors = {}
    for precision in ("float32", "bfloat16"):
        config = hinton_mlp.get_config()
        config.dataset.update(mnist_config)
        config.performance.precision = precision
        rows = pipeline.run(config, str(tmp_path / precision))["rows"]
        errors[precision] = {r["stage"]: r["test_errors"] for r in rows}
    assert errors["float32"].keys() == errors["bfloat16"].keys()
    for stage, f32_errors in errors["float32"].items():
        assert abs(errors["bfloat16"][stage] - f32_errors) <= 30, (stage, errors)
    assert errors["bfloat16"]["teacher"] <= 200


def test_an_unreadable_teacher_cache_is_recomputed_not_fatal(digits, tmp_path, monkeypatch):
    """Cut short, empty, or not an npz at all: the file is ignored and the logits computed."""
    teacher, split = _teacher(digits), DeviceSplit(digits.train)
    calls, real = [], teacher_cache.compute_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "compute_logits", counting)
    options = {"batch_size": 512, "parallel": DataParallel()}
    good = teacher_cache.cached_teacher_logits(
        teacher, split, read_from=[], write_to=str(tmp_path / "good"), **options
    )
    whole = (tmp_path / "good" / CACHE_FILE).read_bytes()
    damaged = {"cut": whole[:100], "empty": b""}
    for name, content in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CACHE_FILE).write_bytes(content)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", good)
    os.replace(tmp_path / "npy" / "x.npy", tmp_path / "npy" / CACHE_FILE)
    for name in (*damaged, "npy"):
        logits = teacher_cache.cached_teacher_logits(
            teacher,
            split,
            read_from=[str(tmp_path / name)],
            write_to=str(tmp_path / name),
            **options,
        )
        np.testing.assert_array_equal(logits, good)
        # Replaced by a readable cache, which the next reader uses.
        teacher_cache.cached_teacher_logits(
            teacher,
            split,
            read_from=[str(tmp_path / name)],
            write_to=str(tmp_path / "x"),
            **options,
        )
    assert len(calls) == 4


def test_several_steps_per_dispatch_on_several_devices_is_refused(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "kdjax", f"--workdir={tmp_path}/run"]
        + ["--config.performance.steps_per_dispatch=8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "performance.steps_per_dispatch=8 runs on one device" in done.stderr
    assert "this run has 2 devices" in done.stderr
    assert not (tmp_path / "run").exists()
