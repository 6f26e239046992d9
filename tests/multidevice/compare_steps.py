"""Trains the same small models on 1, 2 and 8 devices (sharded jit and pmap) and on one device,
and prints, as JSON, the largest difference of each run's final state from the one-device run's.

Run by tests/test_parallel.py in a subprocess with 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX starts).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.config import dataset_config, optimizer_config
from kdjax.data import DeviceSplit, load_dataset
from kdjax.models import build_model, init_variables
from kdjax.train import create_train_state, distill_step, evaluate, fit, make_optimizer, train_step
from kdjax.train.parallel import DataParallel
from kdjax.train.state import FrozenModel


def _max_difference(a, b) -> float:
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(
            lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))), a, b
        )
    )
    return max(leaves)


def _compared(state) -> dict:
    """What must agree: parameters and batch-norm statistics. (The optimizer's momentum is
    reported apart: its last gradient enters unscaled; see tests/test_parallel.py.)"""
    return {"params": state.params, "batch_stats": state.batch_stats}


def main(full: bool) -> None:
    assert jax.device_count() == 8, jax.device_count()
    data = load_dataset(dataset_config("digits"))
    # Sharded jit draws the global batch's randomness, so its runs keep dropout and jitter on;
    # pmap draws per device, so its comparison is on a model without them.
    random_model = build_model(
        {"name": "cnn", "channels": (8, 16), "dense_size": 32, "dropout_rate": 0.25},
        num_classes=10,
        field="student.model",
    )
    plain_model = random_model.clone(dropout_rate=0.0)
    teacher_model = build_model(
        {"name": "cnn", "channels": (16,), "dense_size": 64}, num_classes=10, field="teacher.model"
    )
    teacher = FrozenModel(
        teacher_model.apply,
        init_variables(teacher_model, jax.random.key(7), data.train.images[:1]),
    )
    distill = {"teacher": teacher, "temperature": jnp.float32(4.0), "alpha": jnp.float32(0.7)}
    steps = 10
    report: dict[str, float] = {}

    def trajectory(name, batch_size, parallel, random):
        """States after step 1 and step 10 (the steps of fit, driven by hand to keep both)."""
        model = random_model if random else plain_model
        step, operands = (train_step, {}) if name == "train" else (distill_step, distill)
        split = DeviceSplit(data.train.take(np.arange(steps * batch_size)))
        tx = make_optimizer(optimizer_config(learning_rate=0.1), total_steps=steps, field="o")
        variables = init_variables(model, jax.random.key(0), data.train.images[:1])
        state = create_train_state(model, variables, tx, jax.random.key(1))
        parallel = parallel or DataParallel(jax.devices()[:1])
        step_fn = parallel.compile_step(step, operands, max_shift=1 if random else 0)
        state, saved = parallel.place(state), {}
        for i, batch in enumerate(parallel.train_batches(split, batch_size, seed=3, epoch=0)):
            state, metrics = step_fn(state, batch)
            if i + 1 in (1, steps):
                saved[i + 1] = (jax.device_get(parallel.saved(state)), jax.device_get(metrics))
        return saved

    batch_sizes = (32, 36) if full else (36,)  # 36 on 8 devices: 4 padded rows (ragged)
    device_counts = (1, 2, 8) if full else (2, 8)
    references = {}
    for name in ("train", "distill"):
        for batch_size in batch_sizes:
            runs = [(d, mode, False) for d in device_counts for mode in ("sharded", "pmap")]
            for devices, mode, shard_params in [*runs, (8, "sharded", True)]:
                random = mode == "sharded"
                key = (name, batch_size, random)
                if key not in references:
                    references[key] = trajectory(name, batch_size, None, random)
                parallel = DataParallel(
                    jax.devices()[:devices], mode=mode, shard_params=shard_params
                )
                saved = trajectory(name, batch_size, parallel, random)
                how = mode + ("+fsdp" if shard_params else "")
                for after in (1, steps):
                    state, metrics = saved[after]
                    ref_state, ref_metrics = references[key][after]
                    label = f"{name}/{how}/{devices}dev/b{batch_size}/{after}steps"
                    report[label] = _max_difference(_compared(state), _compared(ref_state))
                    report[label + "/metrics"] = _max_difference(metrics, ref_metrics)
                    report[label + "/momentum"] = _max_difference(
                        state.opt_state, ref_state.opt_state
                    )
    # The epoch loop and evaluation: a fit on 8 devices, and a test split whose 360 examples
    # the devices do not divide at batch 100.
    split = DeviceSplit(data.train.take(np.arange(200)))
    results = {}
    for devices in (1, 8):
        parallel = DataParallel(jax.devices()[:devices])
        tx = make_optimizer(optimizer_config(learning_rate=0.1), total_steps=10, field="o")
        variables = init_variables(plain_model, jax.random.key(0), data.train.images[:1])
        state = create_train_state(plain_model, variables, tx, jax.random.key(1))
        results[devices] = fit(
            state,
            split,
            parallel.compile_step(distill_step, distill),
            epochs=2,
            batch_size=36,
            seed=3,
            parallel=parallel,
        )
    report["fit/sharded/8dev/b36/2epochs"] = _max_difference(
        _compared(results[8].state), _compared(results[1].state)
    )
    report["fit/sharded/8dev/b36/2epochs/history"] = _max_difference(
        results[8].history, results[1].history
    )
    model = results[1].state.frozen()
    one = evaluate(model, DeviceSplit(data.test), 100)
    for devices, mode in ((8, "sharded"), (8, "pmap"), (2, "sharded")):
        parallel = DataParallel(jax.devices()[:devices], mode=mode)
        many = evaluate(model, DeviceSplit(data.test), 100, parallel)
        report[f"eval/{mode}/{devices}dev/errors"] = abs(many["errors"] - one["errors"])
        report[f"eval/{mode}/{devices}dev/loss"] = abs(many["loss"] - one["loss"])
    report["eval/1dev/errors_of_360"] = one["errors"]
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main(full="--full" in sys.argv)
