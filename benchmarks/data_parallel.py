"""Examples/s of one distillation step on 1, 2, 4 and 8 devices, sharded jit and pmap.

    python benchmarks/data_parallel.py [--steps N] [--out benchmarks/results]

On a CPU it runs on 8 *virtual* devices (``--xla_force_host_platform_device_count=8``, set here
unless XLA_FLAGS already is): they share the machine's cores, so the figures show the overhead
of splitting a step, not a speed-up. On a machine with several GPUs or TPUs the same command
measures its real devices (up to 8).

Workloads (the teacher forward in inference mode, the student's forward and backward, SGD with
momentum, in one compiled step, at a fixed global batch):

- ``mlp``: Hinton et al.'s MNIST pair, 784-1200-1200-10 -> 784-800-800-10, batch 256, T = 20.
- ``cnn``: small CNNs with batch norm on 28x28x1, (32, 64) -> (16, 32), batch 256, T = 4.

Prints a table and writes ``data_parallel_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kdjax.config import optimizer_config  # noqa: E402
from kdjax.data import DeviceSplit  # noqa: E402
from kdjax.data.datasets import Split  # noqa: E402
from kdjax.models import build_model, init_variables  # noqa: E402
from kdjax.train import create_train_state, distill_step, make_optimizer  # noqa: E402
from kdjax.train.parallel import DataParallel  # noqa: E402
from kdjax.train.state import FrozenModel  # noqa: E402

WORKLOADS = {
    "mlp": (
        {"name": "mlp", "hidden_sizes": (1200, 1200)},
        {"name": "mlp", "hidden_sizes": (800, 800)},
        20.0,
    ),
    "cnn": (
        {"name": "cnn", "channels": (32, 64), "dense_size": 256},
        {"name": "cnn", "channels": (16, 32), "dense_size": 128},
        4.0,
    ),
}
BATCH = 256


def measure(workload: str, devices: int, mode: str, steps: int) -> dict:
    teacher_config, student_config, temperature = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    split = Split(
        rng.random((BATCH * (steps + 2), 28, 28, 1), dtype=np.float32),
        rng.integers(0, 10, BATCH * (steps + 2)).astype(np.int32),
    )
    example = split.images[:1]
    teacher_model = build_model(teacher_config, num_classes=10, field="teacher.model")
    student_model = build_model(student_config, num_classes=10, field="student.model")
    teacher = FrozenModel(
        teacher_model.apply, init_variables(teacher_model, jax.random.key(1), example)
    )
    tx = make_optimizer(optimizer_config(), total_steps=steps + 2, field="optimizer")
    state = create_train_state(
        student_model,
        init_variables(student_model, jax.random.key(2), example),
        tx,
        jax.random.key(3),
    )
    parallel = DataParallel(jax.devices()[:devices], mode=mode)
    operands = {
        "teacher": teacher,
        "temperature": jnp.float32(temperature),
        "alpha": jnp.float32(0.9),
    }
    step = parallel.compile_step(distill_step, operands)
    state = parallel.place(state)
    batches = list(parallel.train_batches(DeviceSplit(split), BATCH, seed=0, epoch=0))
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batches[1])  # one more warm-up step
    jax.block_until_ready(state)
    times = []
    for batch in batches[2:]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "workload": workload,
        "devices": devices,
        "mode": mode,
        "batch": BATCH,
        "examples_per_s": BATCH / median,
        "examples_per_s_min": BATCH / max(times),
        "examples_per_s_max": BATCH / min(times),
        "first_step_s": compile_s,
        "loss": float(jax.device_get(metrics["loss"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    rows = []
    for workload in WORKLOADS:
        for devices in counts:
            for mode in ("sharded", "pmap") if devices > 1 else ("sharded",):
                rows.append(measure(workload, devices, mode, args.steps))
                print(f"measured {workload} on {devices} device(s), {mode}", file=sys.stderr)
    base = {r["workload"]: r["examples_per_s"] for r in rows if r["devices"] == 1}
    platform = jax.devices()[0].platform
    lines = [
        "| workload | devices | mode | examples/s (median) | min-max | vs 1 device | "
        "first step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["ratio_to_one_device"] = r["examples_per_s"] / base[r["workload"]]
        lines.append(
            f"| {r['workload']} | {r['devices']} | {r['mode']} | {r['examples_per_s']:,.0f} | "
            f"{r['examples_per_s_min']:,.0f}-{r['examples_per_s_max']:,.0f} | "
            f"{r['ratio_to_one_device']:.2f}x | {r['first_step_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_parallel_{platform}.json")
    machine = {
        "platform": platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "virtual_cpu_devices": platform == "cpu",
    }
    with open(path, "w") as f:
        json.dump({"machine": machine, "rows": rows, "table": table}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
