"""The speed benchmark's own arithmetic (FLOP counts, ratios) and, as a slow test, its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models import build_model, init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import kd_speed
    finally:
        sys.path.pop(0)
    return kd_speed


def test_benchmark_flop_count_matches_hand_count_and_xla():
    kd_speed = _benchmark()
    mlp = build_model({"name": "mlp", "hidden_sizes": (1200, 1200)}, num_classes=10, field="m")
    images = jnp.zeros((128, 28, 28, 1))
    variables = init_variables(mlp, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    hand = 2 * 128 * (784 * 1200 + 1200 * 1200 + 1200 * 10)
    assert kd_speed.forward_flops(mlp, variables, images) == hand
    resnet = build_model({"name": "resnet8x4"}, num_classes=100, field="m")
    images = jnp.zeros((2, 32, 32, 3))
    variables = init_variables(resnet, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    counted = kd_speed.forward_flops(resnet, variables, images)
    # resnet8x4: 3x3 convs 3->32 at 32x32, 32->64 and 64->64 at 32x32, 64->128 (stride 2) and
    # 128->128 at 16x16, 128->256 and 256->256 at 8x8, plus three 1x1 projections and the head.
    per_image = 9 * 1024 * (3 * 32 + 32 * 64 + 64 * 64) + 9 * 256 * (64 * 128 + 128 * 128)
    per_image += 9 * 64 * (128 * 256 + 256 * 256) + 1024 * 32 * 64 + 256 * 64 * 128
    per_image += 64 * 128 * 256 + 256 * 100
    assert counted == 2 * 2 * per_image
    forward = jax.jit(lambda v, x: resnet.apply(v, x, train=False))
    xla = kd_speed.xla_flops(forward.lower(variables, images).compile())
    assert 0.9 < counted / xla < 1.1  # XLA adds batch norm, ReLU and pooling arithmetic


def test_summary_ratios_are_against_the_same_workloads_rows():
    kd_speed = _benchmark()

    def row(workload, framework, rate, variant="", batch=64):
        return {
            "workload": workload,
            "framework": framework,
            "variant": variant,
            "examples_per_s": rate,
            "examples_per_s_min": rate,
            "examples_per_s_max": rate,
            "step_s": batch / rate,
            "compile_s": 1.0,
            "peak_memory_mb": 100.0,
        }

    jax_w2 = row("W2", "jax", 30.0) | {"gflops_per_s": 50.0, "flops_per_step": 2e9}
    jax_w2["xla_flops_per_step"] = 2.5e9
    rows = [
        jax_w2,
        row("W2", "torch-eager", 40.0),
        row("W2", "torch-compile", 60.0),
        row("W2", "jax", 36.0, variant=kd_speed.XLA_SWEEP[0]),
        row("W5", "jax", 80.0, variant="lax.map", batch=8 * 64),
        row("W5", "jax", 32.0, variant="1 student"),
        row("W1", "jax", 1000.0, batch=128),
        row("epoch", "jax", 900.0, variant="8 steps/dispatch"),
    ]
    table = kd_speed.summarize(rows, peak_gflops=200.0)
    assert jax_w2["vs_torch_eager"] == pytest.approx(0.75)
    assert jax_w2["vs_torch_compile"] == pytest.approx(0.5)
    assert jax_w2["fraction_of_matmul_peak"] == pytest.approx(0.25)
    assert rows[3]["vs_torch_eager"] == pytest.approx(0.9)  # an XLA option's row
    assert rows[4]["cost_vs_one_student"] == pytest.approx((512 / 80) / (64 / 32))
    assert rows[7]["vs_isolated_step"] == pytest.approx(0.9)
    assert "| W2 | jax | 30.0 | 30.0-30.0 | 0.75x | 0.50x |" in table
    assert "0.80x |" in table  # counted / XLA FLOPs
    assert "8 students cost 3.20x one student's step" in table


@pytest.mark.slow
def test_benchmark_smoke_writes_its_table(tmp_path):
    """The W1 row only (no PyTorch): the command runs, prints the table, writes the JSON."""
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "kd_speed.py"),
            "--quick",
            "--only",
            "W1",
            "--no-torch",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "| W1 | jax |" in done.stdout
    saved = json.loads((tmp_path / "kd_speed_cpu.json").read_text())
    (row,) = saved["rows"]
    assert row["examples_per_s"] > 0 and row["flops_per_step"] == 3 * 128 * 2 * (
        784 * 800 + 800 * 800 + 800 * 10
    ) + 128 * 2 * (784 * 1200 + 1200 * 1200 + 1200 * 10)
    assert saved["matmul_gflops"]["peak_float32"] > 0
