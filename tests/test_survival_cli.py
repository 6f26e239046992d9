"""Runs that survive, end to end through the CLI: kill -9 at random points, SIGTERM, corrupted
checkpoints, NaN, and bad input against a work directory that must not change."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

# The default digits job, shorter, saving every 3 steps so that kills land in saves too.
ARGS = (
    "--config.teacher.epochs=8",
    "--config.student.epochs=8",
    "--config.checkpointing.every_steps=3",
)
STAGES = ("teacher", "student_scratch", "student_distilled")


def _start(workdir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "kdjax", *ARGS, *extra, f"--workdir={workdir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _progress_marker(workdir):
    """Changes whenever the run saves something: a checkpoint step, an epoch, a stage."""
    found = []
    for root, dirs, files in os.walk(workdir):
        found += [os.path.join(root, d) for d in dirs if d.isdigit()]
        found += [os.path.join(root, f) for f in files if f in ("model.json", "metrics.jsonl")]
    return sorted(found)


def _wait_for_progress(proc, workdir, timeout=120):
    """Returns once the run has saved something new (True), or has exited (False)."""
    before, deadline = _progress_marker(workdir), time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if _progress_marker(workdir) != before:
            return True
        time.sleep(0.02)
    raise AssertionError(f"no progress in {workdir} after {timeout} s")


def _variables(workdir, stage):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", stage, "variables")
    restored = ocp.StandardCheckpointer().restore(path)
    leaves = []

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for key in sorted(node):
                walk(node[key], f"{prefix}/{key}")
        else:
            leaves.append((prefix, np.asarray(node)))

    walk(restored)
    return leaves


def _assert_same_models(workdir, reference):
    for stage in STAGES:
        got, want = _variables(workdir, stage), _variables(reference, stage)
        assert [name for name, _ in got] == [name for name, _ in want]
        for (name, g), (_, w) in zip(got, want, strict=True):
            assert np.array_equal(g, w), f"{stage}{name} differs"
    rows = [json.loads((p / "results.json").read_text())["rows"] for p in (workdir, reference)]
    for row, ref in zip(*rows, strict=True):
        assert (row["test_errors"], row["test_loss"]) == (ref["test_errors"], ref["test_loss"])


def _metrics_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, out, err = _finish(_start(workdir))
    assert code == 0, err
    return workdir


def _killed_and_resumed(workdir, kills, seed):
    """Runs the job to the end, killing it with SIGKILL ``kills`` times at random moments
    after it saved something; returns how many resumes found a save that was cut off."""
    rng, killed, cut_off_saves = random.Random(seed), 0, 0
    while True:
        proc = _start(workdir)
        if killed < kills and _wait_for_progress(proc, workdir):
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.kill()
                _, err = proc.communicate()
                killed += 1
                cut_off_saves += err.count("Ignoring the unfinished checkpoint")
                continue
        code, _, err = _finish(proc)
        assert code == 0, err
        cut_off_saves += err.count("Ignoring the unfinished checkpoint")
        return killed, cut_off_saves


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bit_identical(reference, tmp_path):
    workdir = tmp_path / "run"
    killed, _ = _killed_and_resumed(workdir, kills=4, seed=0)
    assert killed >= 3
    _assert_same_models(workdir, reference)
    # One metrics line per stage and epoch, whatever the kills wrote and lost.
    lines = _metrics_lines(workdir)
    assert [(r["stage"], r["epoch"]) for r in lines] == [
        (s, e) for s in STAGES for e in range(1, 9)
    ]
    assert lines == _metrics_lines(reference)
    assert not (workdir / "checkpoints" / "teacher" / "progress").exists()


@pytest.mark.slow
def test_many_kills_then_resume_is_bit_identical(reference, tmp_path):
    workdir = tmp_path / "run"
    killed, cut_off_saves = _killed_and_resumed(workdir, kills=15, seed=1)
    assert killed >= 12
    print(f"{killed} kills, {cut_off_saves} of them during a checkpoint save")
    _assert_same_models(workdir, reference)


def _interrupted(workdir):
    """Starts the job and sends SIGTERM once it has saved something; returns its stderr."""
    proc = _start(workdir)
    assert _wait_for_progress(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 3, err
    return err


def test_sigterm_checkpoints_and_exits_then_resumes(reference, tmp_path):
    workdir = tmp_path / "run"
    err = _interrupted(workdir)
    assert "SIGTERM received: saving a checkpoint after this step" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdjax: error: ") and "interrupted by a signal; checkpoint saved" in last
    assert "Run the same command again to resume." in last
    assert not (workdir / "results.json").exists()
    code, _, err = _finish(_start(workdir))
    assert code == 0, err
    assert "Resuming from step" in err
    _assert_same_models(workdir, reference)


def test_a_second_signal_stops_at_once():
    """The first signal only asks for a checkpoint; the second ends the process as the signal
    itself would. (Signals sent back to back can reach Python's handler as one, so each is
    sent after the previous one was handled.)"""
    script = (
        "import os, signal, sys, time\n"
        "from kdjax.train import preemption\n"
        "with preemption.stop_on_signals(), preemption.training():\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "    print('first: asked', preemption.requested() == signal.SIGINT, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(2)\n"
        "    print('still running', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGINT, done.stderr
    assert done.stdout == "first: asked True\n"


def test_a_signal_outside_training_stops_at_once():
    """Loading data or evaluating has no step boundary to wait for: the signal acts as usual."""
    script = (
        "import os, signal, time\n"
        "from kdjax.train import preemption\n"
        "with preemption.stop_on_signals():\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(2)\n"
        "    print('still running', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGTERM and done.stdout == ""


def test_a_kill_before_the_first_checkpoint_restarts_the_stage_cleanly(reference, tmp_path):
    """With the default cadence (every 2 minutes) a short run is killed before any save: the
    stage starts again, and its metrics lines are not written twice."""
    workdir = tmp_path / "run"
    args = [a for a in ARGS if "checkpointing" not in a]
    command = [sys.executable, "-m", "kdjax", *args, f"--workdir={workdir}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (workdir / "metrics.jsonl").exists() or len(_metrics_lines(workdir)) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "no checkpoint in" in done.stderr and "starting at step 0" in done.stderr
    assert _metrics_lines(workdir) == _metrics_lines(reference)
    _assert_same_models(workdir, reference)


def test_an_interrupted_run_without_workdir_says_which_one_to_resume(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdjax", *ARGS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for_progress(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 3, err
    (run,) = (tmp_path / "runs").iterdir()
    assert f"Add --workdir=runs/{run.name} to it: without it a new run starts." in err


def _snapshot(workdir):
    state = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return state


@pytest.fixture()
def interrupted_run(tmp_path):
    workdir = tmp_path / "run"
    _interrupted(workdir)
    return workdir


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.student.temperature=8"], "unfinished run of another config (student."),
        (["--config.student.temprature=3"], 'Did you mean "temperature"'),
        (["--config.student.temperature=0"], "student.temperature=0.0 must be in [0.05, 100]"),
        (["--config.teacher.model.name=mpl"], "Did you mean 'mlp'"),
        (["--config.on_nonfinite=ignore"], "on_nonfinite='ignore' must be one of stop, skip"),
        (["--config.checkpointing.every_steps=-1"], "every_steps=-1 must be a whole number"),
        (["--config.dataset.raw_dir=/nowhere"], "unfinished run of another config (dataset."),
    ],
)
def test_bad_input_changes_nothing_in_the_work_directory(interrupted_run, args, message):
    before = _snapshot(interrupted_run)
    code, _, err = _finish(_start(interrupted_run, *args))
    assert code == 2, err
    assert err.count("kdjax: error: ") == 1 and message in err and "Traceback" not in err
    assert _snapshot(interrupted_run) == before


def test_a_corrupted_checkpoint_stops_the_resume_naming_the_file(interrupted_run):
    progress = list((interrupted_run / "checkpoints").glob("*/progress"))
    assert len(progress) == 1
    newest = max((p for p in progress[0].iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    files = [p for p in newest.rglob("*") if p.is_file() and p.name != "kdjax-sha256.json"]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-7])
    before = _snapshot(interrupted_run)
    code, _, err = _finish(_start(interrupted_run))
    assert code == 2, err
    assert f"checkpoint file {victim} is corrupted" in err and "--overwrite" in err
    assert _snapshot(interrupted_run) == before


def test_a_diverging_run_stops_with_code_4_naming_the_term(tmp_path):
    workdir = tmp_path / "run"
    code, _, err = _finish(_start(workdir, "--config.teacher.optimizer.learning_rate=1e6"))
    assert code == 4, err
    assert re.search(r"kdjax: error: teacher: non-finite (loss|the gradient).* at step \d+", err)
    assert "on_nonfinite=skip" in err


@pytest.mark.slow
def test_killed_reproduction_resumes_every_population_exactly(tmp_path):
    """The vmapped multi-seed trainer under kill -9: Hinton et al.'s smoke reproduction."""
    from conftest import REPO, raw_dir

    args = (
        f"--config={REPO}/experiments/hinton2015_mnist.py:smoke",
        f"--config.dataset.raw_dir={raw_dir('mnist')}",
        f"--config.dataset.tfds_data_dir={tmp_path / 'tfds'}",
        "--config.checkpointing.every_steps=7",
    )

    def start(workdir):
        return subprocess.Popen(
            [sys.executable, "-m", "kdjax", *args, f"--workdir={workdir}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    code, _, err = _finish(start(tmp_path / "reference"))
    assert code == 0, err
    rng, killed, workdir = random.Random(2), 0, tmp_path / "run"
    while True:
        proc = start(workdir)
        if killed < 6 and _wait_for_progress(proc, workdir, timeout=300):
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
                killed += 1
                continue
        code, _, err = _finish(proc)
        assert code == 0, err
        break
    assert killed >= 4
    got, want = (
        json.loads((d / "results.json").read_text()) for d in (workdir, tmp_path / "reference")
    )
    for part, rows in want["parts"].items():
        for row, ref in zip(got["parts"][part], rows, strict=True):
            assert row["per_seed"] == ref["per_seed"], (part, row["name"])
    teachers = _variables(workdir, "teachers"), _variables(tmp_path / "reference", "teachers")
    for (name, g), (_, w) in zip(*teachers, strict=True):
        assert np.array_equal(g, w), f"teachers{name} differ"
    assert not (workdir / "checkpoints" / "progress").exists()
