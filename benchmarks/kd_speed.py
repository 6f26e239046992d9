"""How fast is a kdjax distillation step, next to PyTorch on the same machine?

    python benchmarks/kd_speed.py [--quick] [--only W1,W2] [--out benchmarks/results]

Workloads (one KD step: the teachers' forward pass in inference mode, the student's forward
and backward pass, SGD with momentum; the images are a fixed random batch, so the figures are
the step's own, with no input pipeline):

- ``W1``: Hinton et al.'s MNIST pair, MLP 784-1200-1200-10 -> 784-800-800-10, batch 128, T=20.
- ``W1-large``: W1 at batch 4096: how close a large step gets to the machine's matmul peak.
- ``W2``: resnet32x4 -> resnet8x4 on 32x32x3 (CIFAR-100's shape), batch 64, T=4.
- ``W3``: resnet56 -> resnet20, batch 64, T=4.
- ``W4``: an ensemble of three resnet32x4 -> resnet8x4 (averaged tempered probabilities).
- ``W5``: W2's teacher and 8 resnet8x4 students at once, one teacher pass
  (:func:`kdjax.train.population.shared_teacher_distill_step`), the students' updates unrolled
  one after another in the same compiled step and, on an accelerator (or with ``--w5-vmap``),
  vmapped (``--w5-map``: through ``lax.map``); against 1 student through the same function.
- ``--xla-sweep``: W2's jax step again under each of XLA's CPU backend options in
  :data:`XLA_SWEEP` (oneDNN, XNNPACK, threading, code generation).
- ``epoch``: W1 trained end to end by :func:`kdjax.train.fit` (on-device data, shuffling and
  gathering included), 1 and 8 steps per dispatch, against the isolated step.

Every (workload, framework) runs in its own process, one after another, so each has the
machine to itself and its own peak memory. Frameworks: ``jax`` (kdjax's own steps), and, when
the optional ``bench`` extra (``torch==2.13.0``) is installed, ``torch-eager`` and
``torch-compile`` (:mod:`benchmarks.torch_kd`, the same models and loss) for W1-W4.

Reported per row: examples/s (median, min and max over repeats after warm-up), the first
step's extra time (compilation), peak memory (resident set on CPU, the device's peak on an
accelerator), FLOPs per step counted from the architectures (convolutions and dense layers:
teacher forward + 3x student forward) next to XLA's own cost analysis of the compiled step,
the achieved GFLOP/s, and that as a fraction of the dense float32 matmul peak measured in the
same run (the model FLOP utilisation). Prints a table and writes ``kd_speed_<platform>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (teachers, student, batch, temperature, image shape, classes)
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": dict(teachers=("mlp1200",), student="mlp800", batch=128, t=20.0, image=(28, 28, 1)),
    "W1-large": dict(
        teachers=("mlp1200",), student="mlp800", batch=4096, t=20.0, image=(28, 28, 1)
    ),
    "W2": dict(teachers=("resnet32x4",), student="resnet8x4", batch=64, t=4.0, image=(32, 32, 3)),
    "W3": dict(teachers=("resnet56",), student="resnet20", batch=64, t=4.0, image=(32, 32, 3)),
    "W4": dict(
        teachers=("resnet32x4",) * 3, student="resnet8x4", batch=64, t=4.0, image=(32, 32, 3)
    ),
    "W5": dict(
        teachers=("resnet32x4",),
        student="resnet8x4",
        batch=64,
        t=4.0,
        image=(32, 32, 3),
        members=8,
    ),
}
ALPHA = 0.9  # weight of the soft term, both frameworks
# (timed steps per repeat, repeats): about the same seconds per workload.
TIMING = {"W1": (50, 5), "W1-large": (5, 5), "W2": (2, 5), "W3": (5, 5), "W4": (1, 5), "W5": (1, 3)}
QUICK_TIMING = {
    "W1": (10, 3),
    "W1-large": (2, 3),
    "W2": (1, 3),
    "W3": (1, 3),
    "W4": (1, 3),
    "W5": (1, 2),
}
TORCH_WORKLOADS = ("W1", "W1-large", "W2", "W3", "W4")
# XLA CPU backend options tried on W2's convolutions (--xla-sweep), each in its own process:
# its oneDNN and XNNPACK paths, threading, and code generation.
XLA_SWEEP = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
)


def model_config(name: str) -> dict[str, Any]:
    """The kdjax model config of a workload's model name."""
    if name.startswith("mlp"):
        width = int(name.removeprefix("mlp"))
        return {"name": "mlp", "hidden_sizes": (width, width)}
    return {"name": name}


def classes_of(workload: dict[str, Any]) -> int:
    return 10 if workload["student"].startswith("mlp") else 100


def peak_memory_mb(device: Any | None = None) -> float:
    """The accelerator's peak bytes in use, or on a CPU this process's peak resident set."""
    if device is not None and device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_steps(run: Callable[[], Any], sync: Callable[[Any], Any], steps: int, repeats: int):
    """(first call's seconds, per-repeat seconds per step) after one more warm-up call."""
    start = time.perf_counter()
    sync(run())
    first = time.perf_counter() - start
    sync(run())
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = run()
        sync(out)
        per_step.append((time.perf_counter() - start) / steps)
    return first, per_step


def rates(batch: int, per_step: list[float], first: float) -> dict[str, float]:
    median = statistics.median(per_step)
    return {
        "examples_per_s": batch / median,
        "examples_per_s_min": batch / max(per_step),
        "examples_per_s_max": batch / min(per_step),
        "step_s": median,
        "compile_s": max(first - median, 0.0),
    }


# --- JAX ---------------------------------------------------------------------------------


def forward_flops(model: Any, variables: Any, images: Any) -> int:
    """2 x multiply-adds of every convolution and dense layer in one inference forward pass."""
    import flax.linen as nn
    import jax

    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.Dense):
            fan_in = args[0].shape[-1]
            if isinstance(module, nn.Conv):
                fan_in = fan_in // module.feature_group_count * math.prod(module.kernel_size)
            total += 2 * out.size * fan_in
        return out

    with nn.intercept_methods(count):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return total


def xla_flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def jax_worker(
    name: str, steps: int, repeats: int, members: int | None = None, loop: str = "vmap"
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from kdjax.distillers import DISTILLERS, TrainingSet
    from kdjax.models import build_model, init_variables
    from kdjax.train import create_train_state, distill_step
    from kdjax.train.method_step import init_distill_state, method_distill_step
    from kdjax.train.population import init_population, shared_teacher_distill_step
    from kdjax.train.state import FrozenModel

    spec = WORKLOADS[name]
    batch_size, classes = spec["batch"], classes_of(spec)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch_size, *spec["image"]), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, classes, batch_size).astype(np.int32))
    batch = {
        "image": images,
        "label": labels,
        "mask": jnp.ones(batch_size, bool),
        "index": jnp.arange(batch_size, dtype=jnp.int32),
    }
    teachers = []
    flops = 0
    for k, teacher_name in enumerate(spec["teachers"]):
        model = build_model(model_config(teacher_name), num_classes=classes, field="teacher")
        variables = init_variables(model, jax.random.key(10 + k), np.asarray(images[:1]))
        teachers.append(FrozenModel(model.apply, variables))
        flops += forward_flops(model, variables, images)
    student = build_model(model_config(spec["student"]), num_classes=classes, field="student")
    student_variables = init_variables(student, jax.random.key(1), np.asarray(images[:1]))
    student_flops = 3 * forward_flops(student, student_variables, images)
    tx = optax.sgd(0.05, momentum=0.9)
    temperature, alpha = jnp.float32(spec["t"]), jnp.float32(ALPHA)
    if name == "W5":
        members = members or spec["members"]
        flops += members * student_flops
        state = init_population(
            student, tx, jax.random.split(jax.random.key(1), members), np.asarray(images[:1])
        )
        step_fn = jax.jit(
            functools.partial(shared_teacher_distill_step, loop=loop), donate_argnums=0
        )
        extra = (teachers[0], jnp.full(members, temperature), jnp.full(members, alpha))
    elif len(teachers) > 1:
        flops += student_flops
        distiller = DISTILLERS.get("kd", field="bench")(temperature=spec["t"])
        ensemble = tuple(teachers)
        state = init_distill_state(
            student,
            tx,
            jax.random.key(1),
            np.asarray(images[:2]),
            teachers[0],
            distiller,
            TrainingSet(batch_size, np.asarray(labels), classes),
        )
        weights = {"ce": jnp.float32(1 - ALPHA), "kd": jnp.float32(ALPHA)}

        def step_fn(state, batch, ensemble, weights):
            return method_distill_step(state, batch, ensemble, weights, distiller=distiller)

        step_fn = jax.jit(step_fn, donate_argnums=0)
        extra = (ensemble, weights)
    else:
        flops += student_flops
        state = create_train_state(student, student_variables, tx, jax.random.key(2))
        step_fn = distill_step
        extra = (teachers[0], temperature, alpha)

    start = time.perf_counter()
    compiled_flops = xla_flops(step_fn.lower(state, batch, *extra).compile())
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = step_fn(holder["state"], batch, *extra)
        return metrics

    first, per_step = time_steps(run, jax.block_until_ready, steps, repeats)
    device = jax.devices()[0]
    examples = batch_size * (members or 1)
    row = rates(examples, per_step, first)
    row.update(
        flops_per_step=flops,
        xla_flops_per_step=compiled_flops,
        compile_s=compile_s,
        gflops_per_s=flops / row["step_s"] / 1e9,
        peak_memory_mb=peak_memory_mb(device),
        loss=float(np.mean(jax.device_get(run()["loss"]))),
    )
    if members:
        row.update(members=members, member_loop=loop)
    return row


def epoch_worker(steps_per_dispatch: int, repeats: int) -> dict:
    """W1 end to end: ``fit`` over an on-device split of MNIST's size (random pixels)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax.config import optimizer_config
    from kdjax.data import DeviceSplit
    from kdjax.data.datasets import Split
    from kdjax.models import build_model, init_variables
    from kdjax.train import create_train_state, distill_step, fit, make_optimizer
    from kdjax.train.state import FrozenModel

    spec = WORKLOADS["W1"]
    rng = np.random.default_rng(0)
    examples = 60_000
    split = DeviceSplit(
        Split(
            rng.random((examples, 28, 28, 1), dtype=np.float32),
            rng.integers(0, 10, examples).astype(np.int32),
        )
    )
    example = np.asarray(split.images[:1])
    teacher_model = build_model(model_config("mlp1200"), num_classes=10, field="teacher")
    teacher = FrozenModel(
        teacher_model.apply, init_variables(teacher_model, jax.random.key(1), example)
    )
    student = build_model(model_config("mlp800"), num_classes=10, field="student")
    batch = spec["batch"]
    per_epoch = split.steps_per_epoch(batch)

    tx = make_optimizer(optimizer_config(), total_steps=per_epoch * (repeats + 1), field="opt")
    state = create_train_state(
        student, init_variables(student, jax.random.key(2), example), tx, jax.random.key(3)
    )

    def step(state, batch):
        return distill_step(state, batch, teacher, jnp.float32(spec["t"]), jnp.float32(ALPHA))

    ends = [time.perf_counter()]
    result = fit(
        state,
        split,
        step,
        epochs=repeats + 1,
        batch_size=batch,
        seed=0,
        name="bench",
        steps_per_dispatch=steps_per_dispatch,
        on_epoch_end=lambda epoch, record: ends.append(time.perf_counter()),
    )
    epoch_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    # The first epoch compiles; the others are whole epochs of steady state.
    row = rates(per_epoch * batch, epoch_s[1:], epoch_s[0])
    row["fit_examples_per_s"] = result.examples_per_s
    row["steps_per_dispatch"] = steps_per_dispatch
    row["peak_memory_mb"] = peak_memory_mb(jax.devices()[0])
    return row


def matmul_worker(size: int = 4096) -> dict:
    """Dense float32 matmul peak, GFLOP/s: numpy (its BLAS), jax.jit, and torch if present."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flops = 2 * size**3
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    result = {}
    if jax.default_backend() == "cpu":
        _, per = time_steps(lambda: a @ a, lambda x: x, 1, 5)
        result["numpy"] = flops / min(per) / 1e9
    x = jnp.asarray(a)
    for dtype in (jnp.float32, jnp.bfloat16):
        y = x.astype(dtype)
        matmul = jax.jit(lambda m: m @ m)
        _, per = time_steps(lambda m=matmul, y=y: m(y), jax.block_until_ready, 3, 5)
        result[f"jax_{jnp.dtype(dtype).name}"] = flops / min(per) / 1e9
    try:
        import torch
    except ImportError:
        pass
    else:
        t = torch.from_numpy(a)
        _, per = time_steps(lambda: t @ t, lambda v: v, 1, 5)
        result["torch"] = flops / min(per) / 1e9
    result["peak_float32"] = max(v for k, v in result.items() if k != "jax_bfloat16")
    return result


# --- PyTorch -----------------------------------------------------------------------------


def torch_worker(name: str, compiled: bool, steps: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_kd

    spec = WORKLOADS[name]
    torch.manual_seed(0)
    classes = classes_of(spec)
    teachers = [torch_kd.build(t, classes) for t in spec["teachers"]]
    student = torch_kd.build(spec["student"], classes)
    if compiled:
        teachers = [torch.compile(t) for t in teachers]
        student = torch.compile(student)
    step = torch_kd.make_step(teachers, student, spec["t"], ALPHA)
    h, w, c = spec["image"]
    images = torch.randn(spec["batch"], c, h, w)
    labels = torch.randint(0, classes, (spec["batch"],))
    first, per_step = time_steps(lambda: step(images, labels), lambda v: v, steps, repeats)
    row = rates(spec["batch"], per_step, first)
    row.update(
        peak_memory_mb=peak_memory_mb(),
        loss=float(step(images, labels)),
        threads=torch.get_num_threads(),
    )
    return row


# --- driver ------------------------------------------------------------------------------


def spawn(args: list[str], timeout: float, xla_flags: str | None = None) -> dict:
    """Runs this file as a worker in a fresh process; its last stdout line is its JSON row.
    ``xla_flags`` are appended to the worker's ``XLA_FLAGS``."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_worker(args: list[str]) -> dict:
    kind = args[0]
    if kind == "matmul":
        return matmul_worker()
    if kind == "epoch":
        return epoch_worker(int(args[1]), int(args[2]))
    name, steps, repeats = args[1], int(args[2]), int(args[3])
    if kind == "jax":
        members = int(args[4]) if len(args) > 4 else None
        return jax_worker(name, steps, repeats, members, *args[5:])
    return torch_worker(name, kind == "torch-compile", steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated workloads, of {', '.join([*WORKLOADS, 'epoch'])} (default: all)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument(
        "--w5-vmap",
        action="store_true",
        help="also time W5 with vmapped students on a CPU (about 20x one student's step "
        "there, and 5 GiB: XLA's CPU grouped convolutions are slow; always run elsewhere)",
    )
    parser.add_argument(
        "--xla-sweep",
        action="store_true",
        help="also time W2's jax step under each of XLA's CPU backend options in XLA_SWEEP "
        "(the attempts at closing the convolution gap; about 2 minutes)",
    )
    parser.add_argument(
        "--w5-map",
        action="store_true",
        help="also time W5 with the students in a lax.map (very slow on a CPU: XLA runs "
        "convolutions inside loops many times slower)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results"),
        help="folder to write kd_speed_<platform>.json in (default: benchmarks/results)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker)))
        return

    import jax

    timing = QUICK_TIMING if args.quick else TIMING
    names = [n for n in args.only.split(",") if n] or [*WORKLOADS, "epoch"]
    unknown = sorted(set(names) - set(WORKLOADS) - {"epoch"})
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {[*WORKLOADS, 'epoch']}")
    platform = jax.default_backend()
    torch_ok = not args.no_torch and platform == "cpu" and _has_torch()
    frameworks = ["jax"] + (["torch-eager", "torch-compile"] if torch_ok else [])
    peak = spawn(["matmul"], 600)
    print(f"matmul peak: {json.dumps(peak)}", file=sys.stderr)
    rows = []
    for name in names:
        if name == "epoch":
            repeats = 2 if args.quick else 3
            for k in (1, 8):
                variant = f"{k} steps/dispatch"
                rows.append(
                    {
                        "workload": "epoch",
                        "framework": "jax",
                        "variant": variant,
                        **spawn(["epoch", str(k), str(repeats)], 1800),
                    }
                )
                print(f"measured epoch, {k} steps per dispatch", file=sys.stderr)
            continue
        steps, repeats = timing[name]
        if name == "W5":
            variants = [("unrolled", 8, "unroll"), ("1 student", 1, "unroll")]
            if platform != "cpu" or args.w5_vmap:
                variants.insert(0, ("vmap", 8, "vmap"))
            if args.w5_map:
                variants.append(("lax.map", 8, "map"))
            for variant, members, loop in variants:
                worker = ["jax", name, str(steps), str(repeats), str(members), loop]
                row = spawn(worker, 1800)
                rows.append({"workload": name, "framework": "jax", "variant": variant, **row})
                print(f"measured W5, {variant}", file=sys.stderr)
            continue
        for framework in frameworks:
            if framework != "jax" and name not in TORCH_WORKLOADS:
                continue
            rows.append(
                {
                    "workload": name,
                    "framework": framework,
                    "variant": "",
                    **spawn([framework, name, str(steps), str(repeats)], 1800),
                }
            )
            print(f"measured {name} with {framework}", file=sys.stderr)
    if args.xla_sweep:
        steps, repeats = timing["W2"]
        for flags in XLA_SWEEP:
            row = spawn(["jax", "W2", str(steps), str(repeats)], 1800, xla_flags=flags)
            rows.append({"workload": "W2", "framework": "jax", "variant": flags, **row})
            print(f"measured W2 with XLA_FLAGS={flags}", file=sys.stderr)
    table = summarize(rows, peak["peak_float32"])
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kd_speed_{platform}.json")
    machine = {
        "platform": platform,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "torch": _torch_version() if torch_ok else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "quick": args.quick,
    }
    with open(path, "w") as f:
        json.dump(
            {"machine": machine, "matmul_gflops": peak, "rows": rows, "table": table}, f, indent=1
        )
    print(f"wrote {path}")


def summarize(rows: list[dict], peak_gflops: float) -> str:
    """The Markdown table; adds each row's ratios to PyTorch (and W5's to one student)."""
    by = {(r["workload"], r["framework"], r["variant"]): r for r in rows}
    lines = [
        "| workload | framework | examples/s (median) | min-max | vs torch eager | "
        "vs torch.compile | compile (s) | peak MiB | GFLOP/s | of matmul peak | "
        "counted / XLA FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["workload"] + (f" ({r['variant']})" if r["variant"] else "")
        if "error" in r:
            lines.append(f"| {label} | {r['framework']} | failed: {r['error']} |" + " |" * 8)
            continue
        eager = by.get((r["workload"], "torch-eager", ""))
        compiled = by.get((r["workload"], "torch-compile", ""))
        if r["framework"] == "jax" and (not r["variant"] or r["variant"] in XLA_SWEEP):
            for key, other in (("vs_torch_eager", eager), ("vs_torch_compile", compiled)):
                if other and "error" not in other:
                    r[key] = r["examples_per_s"] / other["examples_per_s"]
        if r["workload"] == "W5" and r["variant"] in ("vmap", "unrolled", "lax.map"):
            one = by.get(("W5", "jax", "1 student"))
            if one and "error" not in one:
                r["cost_vs_one_student"] = r["step_s"] / one["step_s"]
        if r["workload"] == "epoch":
            isolated = by.get(("W1", "jax", ""))
            if isolated and "error" not in isolated:
                r["vs_isolated_step"] = r["examples_per_s"] / isolated["examples_per_s"]
        gflops = r.get("gflops_per_s")
        counted_vs_xla = None
        if "flops_per_step" in r:
            counted_vs_xla = r["flops_per_step"] / r["xla_flops_per_step"]
        if gflops is not None:
            r["fraction_of_matmul_peak"] = gflops / peak_gflops
        lines.append(
            f"| {label} | {r['framework']} | {r['examples_per_s']:,.1f} | "
            f"{r['examples_per_s_min']:,.1f}-{r['examples_per_s_max']:,.1f} | "
            f"{_ratio(r.get('vs_torch_eager'))} | {_ratio(r.get('vs_torch_compile'))} | "
            f"{r['compile_s']:.1f} | {r['peak_memory_mb']:,.0f} | "
            f"{_num(gflops)} | {_pct(r.get('fraction_of_matmul_peak'))} | "
            f"{_ratio(counted_vs_xla)} |"
        )
    notes = []
    for variant, label in (("vmap", "vmap"), ("unrolled", "unrolled"), ("lax.map", "lax.map")):
        r = by.get(("W5", "jax", variant), {})
        if "cost_vs_one_student" in r:
            notes.append(
                f"W5 ({label}): 8 students cost {r['cost_vs_one_student']:.2f}x one student's "
                "step (both with the same step function)."
            )
    for k in (1, 8):
        r = by.get(("epoch", "jax", f"{k} steps/dispatch"), {})
        if "vs_isolated_step" in r:
            notes.append(
                f"epoch, {k} steps/dispatch: {r['vs_isolated_step']:.0%} of W1's "
                "isolated step throughput (whole epochs, compilation excluded)."
            )
    notes.append(f"matmul peak (float32, measured in this run): {peak_gflops:,.0f} GFLOP/s.")
    return "\n".join(lines + [""] + notes)


def _ratio(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
