"""Config building blocks and the checks a config passes before any work starts.

A kdjax config is an ``ml_collections.ConfigDict``:

- ``name``: experiment name (default work directory ``runs/<name>-<time>``).
- ``seed``: seeds initialisation, dropout and data order.
- ``dataset``: ``name``, ``raw_dir`` (folder of raw files; empty: download), ``tfds_data_dir``.
- ``teacher``, ``student``: a :func:`stage_config` each; ``teacher.checkpoint`` reuses a trained
  teacher; ``student.temperature`` and ``student.alpha`` set the distillation loss.
- ``eval_batch_size``: batch size for evaluation (any value gives exact counts).
- ``checkpointing``: how often training checkpoints (for resume) are saved, and how many kept.
- ``on_nonfinite``: ``stop`` or ``skip`` at a NaN/Inf loss or gradient.
- ``parallel``: which devices, and sharded jit or pmap (:mod:`kdjax.train.parallel`).
- ``performance``: steps per dispatch, mixed precision and the teacher-logit cache
  (:func:`performance_config`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax.data import DATASETS, Dataset
from kdjax.errors import ConfigError
from kdjax.models import build_model
from kdjax.train.loop import ON_NONFINITE
from kdjax.train.optim import OPTIMIZERS, SCHEDULES
from kdjax.train.parallel import parallel_config
from kdjax.train.precision import check_precision

ROLES = ("teacher", "student")


def roles_of(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The trained roles of a config: teacher and student, and a TAKD ``assistant`` if set."""
    return (*ROLES, "assistant") if config.get("assistant") else ROLES


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """SGD with momentum and a cosine schedule unless overridden."""
    defaults = dict(
        name="sgd",  # sgd | adam | adamw
        learning_rate=0.1,  # peak learning rate
        momentum=0.9,  # sgd only; 0 for plain SGD
        nesterov=False,  # sgd only
        weight_decay=0.0,  # L2 coefficient (decoupled for adamw)
        schedule="cosine",  # constant | cosine | linear (decay to 0 over the stage)
        warmup_steps=0,  # linear warm-up from 0 before the schedule
        max_norm=0.0,  # > 0: cap each unit's incoming weight norm after every update
    )
    return ml_collections.ConfigDict(defaults | overrides)


def stage_config(
    *,
    model: Mapping[str, Any],
    epochs: int,
    batch_size: int,
    max_shift: int = 0,
    crop_flip_pad: int = 0,
    **optimizer: Any,
) -> ml_collections.ConfigDict:
    """One model's training: its architecture, epochs, batch size, augmentation and optimizer."""
    return ml_collections.ConfigDict(
        dict(
            model=dict(model),  # {"name": registered model, **its fields}
            epochs=epochs,
            batch_size=batch_size,
            max_shift=max_shift,  # jitter: translate each image by up to this many pixels
            # > 0: CIFAR's augmentation, pad by this many pixels, random crop, random flip
            crop_flip_pad=crop_flip_pad,
            optimizer=optimizer_config(**optimizer),
        )
    )


def dataset_config(
    name: str,
    raw_dir: str = "",
    tfds_data_dir: str = "",
    validation_examples: int = 0,
    train_examples: int = 0,
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name=name,  # digits | mnist | fashion_mnist | cifar10 | cifar100
            raw_dir=raw_dir,  # folder of the original raw files; empty: TFDS downloads
            tfds_data_dir=tfds_data_dir,  # where TFDS keeps prepared data; empty: its default
            # > 0: hold out this many training examples (a fixed choice) for validation
            validation_examples=validation_examples,
            # > 0: train on a fixed class-balanced subset of this many (after validation)
            train_examples=train_examples,
        )
    )


def checkpointing_config(
    every_steps: int = 0, every_seconds: float = 120.0, max_to_keep: int = 2
) -> ml_collections.ConfigDict:
    """How training checkpoints (for resume) are kept; see kdjax.train.resume. Each stage's
    last step, and the step at which a signal stops a run, are always saved."""
    return ml_collections.ConfigDict(
        dict(
            every_steps=every_steps,  # save every this many steps (0: not by steps)
            every_seconds=every_seconds,  # save this long after the last save (0: not by time)
            max_to_keep=max_to_keep,  # saved steps kept per stage (the newest ones)
        )
    )


def performance_config(
    steps_per_dispatch: int = 1, precision: str = "float32", teacher_cache: bool = False
) -> ml_collections.ConfigDict:
    """How fast a run computes; none of these changes what it learns beyond float rounding
    (the README's Performance section has figures: ``benchmarks/kd_speed.py`` times steps
    per dispatch, the MNIST short run bfloat16)."""
    return ml_collections.ConfigDict(
        dict(
            # training steps per call into compiled code (a lax.scan that gathers its own
            # batches on the device); > 1 pays off for small steps. One device only.
            steps_per_dispatch=steps_per_dispatch,
            # float32 | bfloat16: bfloat16 arithmetic, float32 parameters, optimizer state,
            # batch-norm statistics and losses (kdjax.train.precision)
            precision=precision,
            # the distilled student reads the teacher's logits of each training example,
            # computed once and saved beside the teacher (unaugmented training only)
            teacher_cache=teacher_cache,
        )
    )


def survival_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the fields that make a run survive, ``checkpointing`` and ``on_nonfinite``;
    ``parallel``, the devices it runs on (:func:`kdjax.train.parallel.parallel_config`); and
    ``performance`` (:func:`performance_config`)."""
    config.parallel = parallel_config()
    config.performance = performance_config()
    config.checkpointing = checkpointing_config()
    # stop: a NaN/Inf loss or gradient ends the run, naming the term (the last checkpoint is
    # kept); skip: such steps are left out and counted.
    config.on_nonfinite = "stop"
    return config


def _require(config: Mapping[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(f"config has no field {path!r}: start from a config in experiments/.")
        node = node[part]
    return node


def _positive_int(config: Mapping[str, Any], path: str) -> int:
    value = _require(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}={value!r} must be a whole number >= 1.")
    return value


def _number(config: Mapping[str, Any], path: str) -> float:
    value = _require(config, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{path}={value!r} must be a finite number.")
    return float(value)


def _non_negative_int(config: Mapping[str, Any], path: str) -> int:
    value = _require(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}={value!r} must be a whole number >= 0.")
    return value


def _check_optimizer(config: Mapping[str, Any], path: str) -> None:
    learning_rate = _number(config, f"{path}.learning_rate")
    if learning_rate <= 0:
        raise ConfigError(
            f"{path}.learning_rate={learning_rate} must be > 0 (typical: 0.01-0.1 for sgd)."
        )
    optimizer = _require(config, path)
    if "momentum" in optimizer and not 0.0 <= _number(config, f"{path}.momentum") < 1.0:
        raise ConfigError(f"{path}.momentum={optimizer['momentum']} must be in [0, 1).")
    if "weight_decay" in optimizer and _number(config, f"{path}.weight_decay") < 0:
        raise ConfigError(f"{path}.weight_decay={optimizer['weight_decay']} must be >= 0.")
    if "max_norm" in optimizer and _number(config, f"{path}.max_norm") < 0:
        raise ConfigError(f"{path}.max_norm={optimizer['max_norm']} must be >= 0 (0: off).")
    if "warmup_steps" in optimizer:
        _non_negative_int(config, f"{path}.warmup_steps")


def check_seeds(config: Mapping[str, Any]) -> list[int]:
    """``seeds``: a non-empty list of distinct whole numbers >= 0 (one population member each)."""
    seeds = _require(config, "seeds")
    if isinstance(seeds, int | str) or not seeds:
        raise ConfigError(f"seeds={seeds!r} must be a non-empty list, e.g. --config.seeds=0,1,2.")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seeds={list(seeds)!r}: each seed must be a whole number >= 0.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={list(seeds)!r} repeats a seed: list each seed once.")
    return list(seeds)


# The temperatures at which kdjax.losses.soft_kl is tested finite and float32-accurate (its T^2
# factor multiplies float32 rounding: beyond 100 the soft term loses its digits).
TEMPERATURE_RANGE = (0.05, 100.0)


def check_temperature(temperature: float, field: str) -> None:
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ConfigError(
            f"{field}={temperature} must be in [{low:g}, {high:g}]: it divides the logits (1 = "
            "plain softmax; Hinton et al. use 2-20), and outside that range the soft term is "
            "not accurate in float32."
        )


def validate_config(config: Mapping[str, Any]) -> None:
    """Raises :class:`ConfigError` naming the first field kdjax cannot use, and how to fix it.

    Checks everything that can be checked without the data; :func:`check_config_fits_data`
    does the rest once the dataset is loaded.
    """
    DATASETS.get(_require(config, "dataset.name"), field="dataset.name")
    _positive_int(config, "eval_batch_size")
    if "seeds" in config:
        check_seeds(config)
    else:
        _non_negative_int(config, "seed")
    for field in ("validation_examples", "train_examples"):
        if field in config["dataset"]:
            _non_negative_int(config, f"dataset.{field}")
    for role in roles_of(config):
        # Building a module only checks its name and fields; nothing is initialised.
        model_config = _require(config, f"{role}.model")
        build_model(
            model_config, num_classes=model_config.get("num_classes", 1), field=f"{role}.model"
        )
        _positive_int(config, f"{role}.epochs")
        _positive_int(config, f"{role}.batch_size")
        OPTIMIZERS.get(_require(config, f"{role}.optimizer.name"), field=f"{role}.optimizer.name")
        SCHEDULES.get(
            _require(config, f"{role}.optimizer.schedule"), field=f"{role}.optimizer.schedule"
        )
        _check_optimizer(config, f"{role}.optimizer")
        for augmentation in ("max_shift", "crop_flip_pad"):
            if augmentation in config[role]:
                _non_negative_int(config, f"{role}.{augmentation}")
    classes = {r: config[r]["model"].get("num_classes") for r in ROLES}
    if None not in classes.values() and classes["teacher"] != classes["student"]:
        raise ConfigError(
            f"teacher.model.num_classes={classes['teacher']} but student.model.num_classes="
            f"{classes['student']}: distillation needs the same classes. Make them equal, or "
            "remove both (they are taken from the dataset)."
        )
    if "temperature" in config["student"]:  # the zoo's students name a distiller instead
        check_temperature(_number(config, "student.temperature"), "student.temperature")
    alpha = _number(config, "student.alpha") if "alpha" in config["student"] else 0.0
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"student.alpha={alpha} must be in [0, 1]: it is the weight of the teacher's soft "
            "targets (1 - alpha weighs the hard labels)."
        )
    _check_survival_fields(config)
    checkpoint = config["teacher"].get("checkpoint", "")
    if checkpoint and not os.path.exists(checkpoint):
        raise ConfigError(
            f"teacher.checkpoint={checkpoint!r} does not exist: give the work directory of an "
            "earlier kdjax run (or its checkpoints/teacher folder), or leave it empty to fit one."
        )


def check_config_fits_data(config: Mapping[str, Any], dataset: Dataset) -> None:
    """Checks the config against the loaded dataset (classes, training-set size)."""
    for role in roles_of(config):
        build_model(config[role]["model"], num_classes=dataset.num_classes, field=f"{role}.model")
        batch_size = config[role]["batch_size"]
        if batch_size > len(dataset.train):
            raise ConfigError(
                f"{role}.batch_size={batch_size} is larger than the {len(dataset.train)} training "
                f"examples of {dataset.name!r}: lower it."
            )


def check_performance(config: Mapping[str, Any], *, runner: str = "pipeline") -> None:
    """Raises :class:`ConfigError` for a ``performance`` section kdjax cannot use."""
    section = config.get("performance", {})
    unknown = sorted(set(section) - set(performance_config()))
    if unknown:
        raise ConfigError(
            f"performance.{unknown[0]}: no such field; the fields are "
            f"{', '.join(performance_config())}."
        )
    if "steps_per_dispatch" in section:
        _positive_int(config, "performance.steps_per_dispatch")
    precision = check_precision(section.get("precision", "float32"))
    cache = section.get("teacher_cache", False)
    if not isinstance(cache, bool):
        raise ConfigError(f"performance.teacher_cache={cache!r} must be true or false.")
    if runner != "pipeline" and (precision != "float32" or cache):
        raise ConfigError(
            f"performance.precision={precision!r}, teacher_cache={cache}: the {runner} runner "
            "trains float32 populations and computes its teachers' logits once already; leave "
            "them at float32 and false, or use the pipeline runner."
        )
    if cache:
        augmented = [
            f"student.{field}={config['student'][field]}"
            for field in ("max_shift", "crop_flip_pad")
            if config["student"].get(field, 0)
        ]
        if augmented:
            raise ConfigError(
                f"performance.teacher_cache=true with {', '.join(augmented)}: a cached logit is "
                "the teacher's output for the unaugmented image, but an augmented student must "
                "be taught on the view it sees. Set teacher_cache=false, or turn the student's "
                "augmentation off."
            )


def _check_survival_fields(config: Mapping[str, Any]) -> None:
    if "checkpointing" in config:
        _non_negative_int(config, "checkpointing.every_steps")
        if _number(config, "checkpointing.every_seconds") < 0:
            raise ConfigError(
                f"checkpointing.every_seconds={config['checkpointing']['every_seconds']} must be "
                ">= 0 (0: save only by steps, at the end and on a signal)."
            )
        _positive_int(config, "checkpointing.max_to_keep")
    if "on_nonfinite" in config and config["on_nonfinite"] not in ON_NONFINITE:
        raise ConfigError(
            f"on_nonfinite={config['on_nonfinite']!r} must be one of {', '.join(ON_NONFINITE)} "
            "(stop: end the run at the first NaN/Inf loss or gradient; skip: leave such steps "
            "out and count them)."
        )


def check_models_fit_data(models: Mapping[str, nn.Module], dataset: Dataset) -> None:
    """Traces each model on the dataset's image shape (shapes only, no arithmetic), so that a
    model that cannot take these images, or shrinks them to nothing, fails here, naming its
    field, before any work."""
    example = jax.ShapeDtypeStruct((1, *dataset.image_shape), jnp.float32)
    for field, model in models.items():

        def forward(x, model=model):
            variables = model.init(jax.random.key(0), x, train=False)
            return model.apply(variables, x, train=False)

        try:
            _, features = jax.eval_shape(forward, example)
        except Exception as err:  # flax and XLA raise many types for a shape that does not fit
            message = " ".join(str(err).split())[:300]
            raise ConfigError(
                f"{field} cannot take {dataset.name!r} images of shape {dataset.image_shape}: "
                f"{message}. Choose a model (or model fields) for images of this size."
            ) from err
        for name, feature in features.items():
            if 0 in feature.shape:
                raise ConfigError(
                    f"{field}: on {dataset.name!r} images of shape {dataset.image_shape} its "
                    f"feature {name!r} has shape {tuple(feature.shape)}, with nothing left to "
                    "learn from: use fewer pooling stages (or larger images)."
                )
