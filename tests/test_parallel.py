"""Many devices and many processes: the same numbers as one device.

The multi-device comparisons run in a subprocess with 8 virtual CPU devices (the device count
is fixed when JAX starts, and the rest of the suite runs on one): tests/multidevice/
compare_steps.py prints the largest difference of every run from the one-device run.

Tolerances (float32): parameters and batch-norm statistics within 1e-5 of the one-device run
after 1 and 10 SGD steps (measured: at most 3.2e-7), logged metrics within 1e-5 (measured
5.8e-7); evaluation counts exactly equal. Only the summation order differs.

The SGD momentum buffer is reported but not asserted: on 2 devices one element of the first
convolution's last gradient differs by 4.4e-4 (of 0.42), a max-pool tie broken the other way by
a last-bit difference. The cosine schedule's last learning rate is ~0, so the parameters do not
see it; an earlier step's flip would move parameters by lr x that, which is why 10 steps is the
test's length.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from kdjax import checkpoint, distributed
from kdjax.errors import ConfigError
from kdjax.models import build_model, init_variables
from kdjax.models.norm import BatchNorm, batch_statistics
from kdjax.train.parallel import DataParallel, check_parallel_config

STATE_TOLERANCE = 1e-5
METRIC_TOLERANCE = 1e-5


def _eight_device_env() -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def comparison() -> dict[str, float]:
    script = REPO / "tests" / "multidevice" / "compare_steps.py"
    done = subprocess.run(
        [sys.executable, str(script)],
        env=_eight_device_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("step", ["train", "distill"])
@pytest.mark.parametrize(
    "how", ["sharded/2dev", "sharded/8dev", "pmap/2dev", "pmap/8dev", "sharded+fsdp/8dev"]
)
@pytest.mark.parametrize("steps", [1, 10])
def test_many_devices_give_the_one_device_parameters(comparison, step, how, steps):
    # Batch 36: on 8 devices each batch is padded to 40 with 4 masked rows (ragged).
    label = f"{step}/{how}/b36/{steps}steps"
    assert comparison[label] <= STATE_TOLERANCE, (label, comparison[label])
    assert comparison[label + "/metrics"] <= METRIC_TOLERANCE, comparison[label + "/metrics"]


def test_the_epoch_loop_on_eight_devices_matches_one(comparison):
    assert comparison["fit/sharded/8dev/b36/2epochs"] <= STATE_TOLERANCE
    assert comparison["fit/sharded/8dev/b36/2epochs/history"] <= METRIC_TOLERANCE


@pytest.mark.parametrize("how", ["sharded/8dev", "pmap/8dev", "sharded/2dev"])
def test_evaluation_on_many_devices_counts_every_example_once(comparison, how):
    # 360 test examples in batches of 100: the last batch has 60, padded to 104 on 8 devices.
    assert comparison["eval/1dev/errors_of_360"] > 0  # a model that makes some errors
    assert comparison[f"eval/{how}/errors"] == 0
    assert comparison[f"eval/{how}/loss"] <= 1e-6


# --- batch norm --------------------------------------------------------------------------------


def test_batch_norm_is_flax_batch_norm_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 3)) * 3 + 1
    ours, flax_bn = (
        BatchNorm(use_running_average=False),
        nn.BatchNorm(use_running_average=False, momentum=0.9),
    )
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        flax_bn.init(jax.random.key(1), x)
    )
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    y_flax, updates_flax = flax_bn.apply(variables, x, mutable=["batch_stats"])
    assert np.array_equal(y, y_flax)
    for a, b in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(updates_flax), strict=True
    ):
        assert np.array_equal(a, b)


def test_masked_batch_norm_ignores_padded_rows():
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 3)) * 2 - 1
    padded = jnp.concatenate([x, jnp.full((2, 4, 4, 3), 1e3)])
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(1), x)

    def masked(images, mask):
        with batch_statistics(mask=mask):
            return bn.apply(variables, images, mutable=["batch_stats"])

    y, stats = bn.apply(variables, x, mutable=["batch_stats"])
    y_padded, stats_padded = jax.jit(masked)(padded, jnp.arange(8) < 6)
    np.testing.assert_allclose(y_padded[:6], y, atol=1e-6)
    mean = np.asarray(x).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(stats_padded["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(
        stats_padded["batch_stats"]["var"], stats["batch_stats"]["var"], atol=1e-6
    )


# --- what users type -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, message",
    [
        ({"mode": "pmapp"}, "parallel.mode='pmapp' must be one of sharded, pmap"),
        ({"devices": -1}, "parallel.devices=-1 must be a whole number >= 0"),
        ({"devices": 64}, "parallel.devices=64, but this job has 1 device(s)"),
        ({"mode": "pmap", "shard_params": True}, "shard_params needs mode=sharded"),
    ],
)
def test_a_bad_parallel_section_is_refused(section, message):
    with pytest.raises(ConfigError) as err:
        check_parallel_config(section)
    assert message in str(err.value)


def test_one_device_is_the_plain_path():
    parallel = DataParallel.from_config(None)
    assert parallel.single and parallel.num_devices == jax.device_count() == 1
    tree = {"w": np.ones(3)}
    assert parallel.place(tree) is tree


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KDJAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS is not"),
        (
            {"JAX_COORDINATOR_ADDRESS": "localhost:1", "KDJAX_NUM_PROCESSES": "2"},
            "set both KDJAX_NUM_PROCESSES and KDJAX_PROCESS_ID",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1",
                "KDJAX_NUM_PROCESSES": "2",
                "KDJAX_PROCESS_ID": "2",
            },
            "KDJAX_PROCESS_ID=2 must be in [0, KDJAX_NUM_PROCESSES=2)",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "localhost:1"},
            "JAX_COORDINATOR_ADDRESS is set but KDJAX_NUM_PROCESSES and KDJAX_PROCESS_ID are not",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost",
                "KDJAX_NUM_PROCESSES": "2",
                "KDJAX_PROCESS_ID": "0",
            },
            "must be process 0's host:port",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1",
                "KDJAX_NUM_PROCESSES": "0",
                "KDJAX_PROCESS_ID": "0",
            },
            "KDJAX_NUM_PROCESSES=0 must be >= 1",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1",
                "KDJAX_NUM_PROCESSES": "two",
                "KDJAX_PROCESS_ID": "0",
            },
            "KDJAX_NUM_PROCESSES='two' must be a whole number",
        ),
    ],
)
def test_a_bad_multi_process_environment_is_refused(monkeypatch, env, message):
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        distributed.initialize()
    assert message in str(err.value)


def test_a_coordinator_port_in_use_is_refused(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(distributed.COORDINATOR, f"localhost:{port}")
        monkeypatch.setenv(distributed.NUM_PROCESSES, "2")
        monkeypatch.setenv(distributed.PROCESS_ID, "0")
        with pytest.raises(ConfigError) as err:
            distributed.initialize()
    assert f"port {port} cannot be served here" in str(err.value)


def test_without_a_cluster_a_job_is_one_process(monkeypatch):
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_primary()


# --- two processes over localhost ------------------------------------------------------------

SMOKE = [f"--config={REPO / 'kdjax' / 'configs' / 'default.py'}:smoke"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _kdjax(workdir, *, process: int | None = None, port: int = 0, extra=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        env.pop(name, None)
    if process is not None:
        env.update(
            {
                distributed.COORDINATOR: f"localhost:{port}",
                distributed.NUM_PROCESSES: "2",
                distributed.PROCESS_ID: str(process),
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            }
        )
    command = [sys.executable, "-m", "kdjax", *SMOKE, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _two_processes(workdir, extra=()):
    port = _free_port()
    return [_kdjax(workdir, process=p, port=port, extra=extra) for p in (0, 1)]


def _finish(processes):
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _student(workdir):
    """The distilled student's variables, restored on this (one-device) process."""
    model = build_model(
        {"name": "mlp", "hidden_sizes": (32,), "dropout_rate": 0.0, "input_dropout_rate": 0.0},
        num_classes=10,
        field="student.model",
    )
    abstract = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    )
    directory = workdir / "checkpoints" / "student_distilled"
    return checkpoint.restore_variables(str(directory), abstract)


STAGE_FIELDS = ("stage", "test_errors")
CHECKPOINT_OFTEN = ["--config.checkpointing.every_steps=5"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one") / "run"
    _finish([_kdjax(workdir)])
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two") / "run"
    outputs = _finish(_two_processes(workdir, extra=CHECKPOINT_OFTEN))
    return workdir, outputs


def test_two_processes_match_one(one_process, two_processes):
    workdir, outputs = two_processes
    rows = [json.loads((w / "results.json").read_text())["rows"] for w in (one_process, workdir)]
    assert [[r[f] for f in STAGE_FIELDS] for r in rows[0]] == [
        [r[f] for f in STAGE_FIELDS] for r in rows[1]
    ]
    for one, two in zip(*rows, strict=True):
        assert abs(one["test_loss"] - two["test_loss"]) < 1e-4
    results = json.loads((workdir / "results.json").read_text())
    assert results["devices"] == "4 cpu devices over 2 process(es), sharded"
    got, want = _student(workdir), _student(one_process)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # Logged and printed once: process 1 prints no table and logs no progress.
    (out0, err0), (out1, err1) = outputs
    # (gloo, the CPU collectives library, prints its connections to stdout in both.)
    assert "| student_distilled |" in out0 and "| student_distilled |" not in out1
    assert "epoch 1/2" in err0 and "epoch 1/2" not in err1
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2  # three stages, two epochs each, written once


def _two_processes_until_a_checkpoint(workdir, stage):
    """Two processes of the job (a checkpoint every 5 steps), returned once ``stage`` has
    written a verified checkpoint."""
    processes = _two_processes(workdir, CHECKPOINT_OFTEN)
    progress = workdir / "checkpoints" / stage / "progress"
    deadline = time.monotonic() + 300
    while not list(progress.glob("*/kdjax-sha256.json")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.02)
    return processes


def _assert_same_student(workdir, reference):
    got, want = _student(workdir), _student(reference)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_two_processes_killed_mid_stage_resume_to_the_same_result(two_processes, tmp_path):
    reference, _ = two_processes
    workdir = tmp_path / "run"
    processes = _two_processes_until_a_checkpoint(workdir, "student_scratch")
    for p in processes:
        p.kill()
        p.communicate()
    assert not (workdir / "results.json").exists()
    _finish(_two_processes(workdir, CHECKPOINT_OFTEN))
    _assert_same_student(workdir, reference)
    rows = [json.loads((w / "results.json").read_text())["rows"] for w in (workdir, reference)]
    assert [r["test_errors"] for r in rows[0]] == [r["test_errors"] for r in rows[1]]


@pytest.mark.parametrize("runner", ["zoo", "hinton2015"])
def test_population_runners_refuse_more_than_one_device(runner):
    from kdjax.train.parallel import check_one_device_runner

    check_one_device_runner({"devices": 0}, runner)  # the defaults: fine
    with pytest.raises(ConfigError) as err:
        check_one_device_runner({"mode": "pmap"}, runner)
    assert f"the {runner} runner trains its vmapped populations on one device" in str(err.value)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(two_processes, tmp_path):
    """A scheduler's SIGTERM may reach the processes at different steps, or only one of them:
    they agree (every 16 steps) and all save the same step and stop; the rerun resumes."""
    reference, _ = two_processes
    workdir = tmp_path / "run"
    processes = _two_processes_until_a_checkpoint(workdir, "teacher")
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [3, 3], [err[-2000:] for _, err in outputs]
    assert "SIGTERM received" in outputs[1][1]
    for _, err in outputs:
        assert "interrupted by a signal; checkpoint saved at step" in err
    steps = [err.split("checkpoint saved at step ")[1].split()[0] for _, err in outputs]
    assert steps[0] == steps[1]
    assert not (workdir / "results.json").exists()
    _finish(_two_processes(workdir, CHECKPOINT_OFTEN))
    _assert_same_student(workdir, reference)


def test_processes_given_different_configs_are_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    port = _free_port()
    processes = [
        _kdjax(workdir, process=p, port=port, extra=[f"--config.seed={p}"]) for p in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    for _, err in outputs:
        assert "were given another config or workdir than process 0" in err
    assert not workdir.exists()
