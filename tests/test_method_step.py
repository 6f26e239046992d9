"""The distiller step: it matches the Hinton step, populations match lone members, ensembles
and every method run on every model family, and runs with a memory bank resume exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import DeviceSplit
from kdjax.distillers import DISTILLERS, TrainingSet, build_distiller
from kdjax.models import build_model
from kdjax.train import distill_step, fit, make_optimizer, preemption
from kdjax.train.method_step import (
    init_distill_state,
    method_distill_step,
    population_method_distill_step,
)
from kdjax.train.population import init_member, member, member_keys, stack_members
from kdjax.train.state import FrozenModel
from tests.test_resume import _assert_bit_identical, _interrupted_then_resumed

BATCH = 64


def _tx(steps=100):
    config = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "schedule": "cosine"}
    return make_optimizer(config, total_steps=steps, field="student.optimizer")


def _cnn(channels, dense):
    config = {"name": "cnn", "channels": channels, "dense_size": dense}
    return build_model(config, num_classes=10, field="model")


@pytest.fixture(scope="module")
def cnn_teacher(digits):
    """A briefly trained CNN teacher on the digits (trained: its features are informative)."""
    from kdjax.train import train_step

    state = init_member(_cnn((16, 32), 64), _tx(), jax.random.key(7), digits.train.images[:1])
    return fit(state, DeviceSplit(digits.train), train_step, epochs=2, batch_size=BATCH, seed=0)


def _training_set(digits):
    return TrainingSet(len(digits.train), digits.train.labels, 10)


def _weights(spec):
    return {k: jnp.float32(v) for k, v in spec.weights.items()}


def _state(digits, spec, teacher, key=1, model=None):
    return init_distill_state(
        model or _cnn((8, 16), 32),
        _tx(),
        jax.random.key(key),
        digits.train.images[:2],
        teacher,
        spec.distiller,
        _training_set(digits),
    )


def test_kd_distiller_takes_the_same_steps_as_the_hinton_step(digits, cnn_teacher):
    """weights ce = 1 - alpha, kd = alpha is kd_loss: the same updates as distill_step."""
    teacher = cnn_teacher.state.frozen()
    spec = build_distiller({"name": "kd", "temperature": 3.0, "weights": {"ce": 0.3, "kd": 0.7}})
    split = DeviceSplit(digits.train)
    model = _cnn((8, 16), 32)
    method = fit(
        _state(digits, spec, teacher, model=model),
        split,
        functools.partial(
            method_distill_step,
            teachers=(teacher,),
            weights=_weights(spec),
            distiller=spec.distiller,
        ),
        epochs=1,
        batch_size=BATCH,
        seed=3,
    )
    hinton = fit(
        init_member(model, _tx(), jax.random.key(1), digits.train.images[:1]),
        split,
        functools.partial(
            distill_step, teacher=teacher, temperature=jnp.float32(3.0), alpha=jnp.float32(0.7)
        ),
        epochs=1,
        batch_size=BATCH,
        seed=3,
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(method.state.params["student"]),
        jax.tree_util.tree_leaves(hinton.state.params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert method.history[0]["loss"] == pytest.approx(hinton.history[0]["loss"], rel=1e-5)
    # Each term is logged raw and weighted.
    record = method.history[0]
    assert record["kd_weighted"] == pytest.approx(0.7 * record["kd"], rel=1e-5)
    assert record["ce_weighted"] == pytest.approx(0.3 * record["ce"], rel=1e-5)


def test_an_ensemble_of_equal_teachers_teaches_as_one(digits, cnn_teacher):
    teacher = cnn_teacher.state.frozen()
    spec = build_distiller({"name": "kd"})
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    step = functools.partial(method_distill_step, weights=_weights(spec), distiller=spec.distiller)
    one, m1 = step(_state(digits, spec, teacher), batch, (teacher,))
    three, m3 = step(_state(digits, spec, teacher), batch, (teacher,) * 3)
    assert float(m3["kd"]) == pytest.approx(float(m1["kd"]), rel=1e-5)
    leaves = zip(
        jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(three.params), strict=True
    )
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_ensemble_averages_probabilities_in_the_step(digits, cnn_teacher):
    """Two different teachers: the step's kd term is the KL to their averaged probabilities."""
    from kdjax.distillers.kd import ensemble_soft_kl

    first = cnn_teacher.state.frozen()
    other = init_member(_cnn((16, 32), 64), _tx(), jax.random.key(9), digits.train.images[:1])
    second = other.frozen()
    spec = build_distiller({"name": "kd", "temperature": 2.0})
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    state = _state(digits, spec, first)
    # The student's training-mode logits before the update (no dropout in this CNN).
    logits, _ = state.apply_fn(
        {"params": state.params["student"], "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )[0]
    teachers = jnp.stack([first(batch["image"])[0], second(batch["image"])[0]])
    expected = ensemble_soft_kl(logits, teachers, 2.0)
    probs = jax.nn.softmax(teachers / 2.0, -1).mean(0)
    by_hand = 4.0 * np.mean(
        np.sum(probs * (np.log(probs) - jax.nn.log_softmax(logits / 2.0, -1)), -1)
    )
    assert float(expected) == pytest.approx(float(by_hand), rel=1e-4)
    _, metrics = method_distill_step(
        state, batch, (first, second), _weights(spec), distiller=spec.distiller
    )
    assert float(metrics["kd"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", [pytest.param("fitnet", marks=pytest.mark.slow), "crd"])
def test_a_population_member_matches_the_lone_run(digits, cnn_teacher, name):
    """Trainable distiller parameters (fitnet) and buffers (crd) under vmap, 2 members, 4 steps.

    Tolerance: a vmapped convolution sums in another order than a lone one (1 step: 6e-8
    apart); over a whole epoch FitNets' weight-100 hint amplifies that to ~1e-3, so the
    comparison is after a few steps.
    """
    teacher = cnn_teacher.state.frozen()
    extra = {"negatives": 32} if name == "crd" else {}
    spec = build_distiller({"name": name, **extra})
    split = DeviceSplit(digits.train)
    seeds = [4, 1]
    teachers = stack_members([teacher, teacher])
    states = jax.vmap(
        lambda k, t: init_distill_state(
            _cnn((8, 16), 32),
            _tx(),
            k,
            digits.train.images[:2],
            t,
            spec.distiller,
            _training_set(digits),
        )
    )(member_keys(seeds), teachers)
    lone = _state(digits, spec, teacher, key=1)
    common = dict(weights=_weights(spec), distiller=spec.distiller, steps_per_epoch=22)
    population_batches = split.train_batches(BATCH, seed=seeds, epoch=0)
    lone_batches = split.train_batches(BATCH, seed=1, epoch=0)
    for _ in range(4):
        states, _ = population_method_distill_step(
            states, next(population_batches), (teachers,), **common
        )
        lone, _ = method_distill_step(lone, next(lone_batches), (teacher,), **common)
    together = member(states, 1)
    for tree in ("params", "buffers", "batch_stats"):
        for a, b in zip(
            jax.tree_util.tree_leaves(getattr(together, tree)),
            jax.tree_util.tree_leaves(getattr(lone, tree)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_crd_with_its_memory_bank_resumes_bit_identical(digits, cnn_teacher, tmp_path):
    preemption._requested.clear()
    teacher = cnn_teacher.state.frozen()
    spec = build_distiller({"name": "crd", "negatives": 32})
    split = DeviceSplit(digits.train)
    step = functools.partial(
        method_distill_step,
        teachers=(teacher,),
        weights=_weights(spec),
        distiller=spec.distiller,
        steps_per_epoch=22,
    )

    def fresh():
        return _state(digits, spec, teacher)

    uninterrupted = fit(fresh(), split, step, epochs=3, batch_size=BATCH, seed=2)
    resumed = _interrupted_then_resumed(fresh, split, step, 2, str(tmp_path / "ckpt"), [9, 40])
    _assert_bit_identical(uninterrupted.state.params, resumed.state.params)
    _assert_bit_identical(uninterrupted.state.buffers, resumed.state.buffers)
    assert resumed.history == uninterrupted.history


def test_dkd_warm_up_ramps_the_teacher_terms_only(digits, cnn_teacher):
    teacher = cnn_teacher.state.frozen()
    spec = build_distiller({"name": "dkd", "warmup_epochs": 4})
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    step = functools.partial(
        method_distill_step,
        teachers=(teacher,),
        weights=_weights(spec),
        distiller=spec.distiller,
        warmup_epochs=4.0,
        steps_per_epoch=10,
    )
    state = _state(digits, spec, teacher)
    _, first = step(state, batch)  # step 0 of a 40-step ramp: 1/40
    assert float(first["nckd_weighted"]) == pytest.approx(8.0 / 40 * float(first["nckd"]), rel=1e-5)
    assert float(first["tckd_weighted"]) == pytest.approx(1.0 / 40 * float(first["tckd"]), rel=1e-5)
    assert float(first["ce_weighted"]) == pytest.approx(float(first["ce"]), rel=1e-6)
    later = _state(digits, spec, teacher).replace(step=jnp.int32(45))  # past the ramp
    _, after = step(later, batch)
    assert float(after["nckd_weighted"]) == pytest.approx(8.0 * float(after["nckd"]), rel=1e-5)


# One step of every method on every model family. The methods read these features, which every
# family has (stage1 is each family's first stage; pre_logits the pooled embedding).
_FEATURE_SETTINGS = {
    "fitnet": dict(student_feature="stage1", teacher_feature="stage1"),
    "at": dict(student_features=("stage1",), teacher_features=("stage1",)),
    "sp": dict(student_feature="stage1", teacher_feature="stage1"),
    "crd": dict(negatives=16),
}
_FAST_FAMILIES = {"cnn": {"name": "cnn", "channels": (8, 16), "dense_size": 16}}
_CIFAR_FAMILIES = {
    "resnet": {"name": "resnet8"},
    "wrn": {"name": "wrn_16_1"},
    "vgg": {"name": "vgg8"},
    "mobilenetv2": {"name": "mobilenetv2"},
    "shufflenetv1": {"name": "shufflenetv1"},
    "shufflenetv2": {"name": "shufflenetv2"},
}


def _one_step_of_every_method(model_config, images, labels):
    model = build_model(model_config, num_classes=10, field="model")
    teacher = init_member(model, _tx(), jax.random.key(5), images[:1]).frozen()
    batch = {
        "image": jnp.asarray(images),
        "label": jnp.asarray(labels),
        "mask": jnp.ones(len(labels), bool),
        "index": jnp.arange(len(labels), dtype=jnp.int32),
    }
    training_set = TrainingSet(len(labels), labels, 10)
    for name in DISTILLERS.names():
        if model_config["name"] == "mlp" and name in ("at", "sp", "fitnet"):
            continue  # stage features are spatial maps; an MLP has none
        spec = build_distiller({"name": name, **_FEATURE_SETTINGS.get(name, {})})
        state = init_distill_state(
            model, _tx(), jax.random.key(1), images, teacher, spec.distiller, training_set
        )
        before = jax.tree_util.tree_map(np.asarray, state.params["student"])  # state is donated
        new, metrics = method_distill_step(
            state, batch, (teacher,), _weights(spec), distiller=spec.distiller
        )
        assert float(metrics["nonfinite"]) == 0.0, (model_config, name, metrics)
        for term in spec.distiller.term_names:
            assert np.isfinite(float(metrics[term])), (model_config, name, term)
        assert int(new.step) == 1
        moved = jax.tree_util.tree_map(
            lambda a, b: bool(np.any(a != np.asarray(b))), before, new.params["student"]
        )
        assert any(jax.tree_util.tree_leaves(moved)), (model_config, name)


@pytest.mark.slow
def test_every_method_takes_a_step_on_the_small_models(digits):
    images, labels = digits.train.images[:16], digits.train.labels[:16]
    for config in _FAST_FAMILIES.values():
        _one_step_of_every_method(config, images, labels)
    _one_step_of_every_method({"name": "mlp", "hidden_sizes": (16,)}, images, labels)


@pytest.mark.slow
def test_every_method_takes_a_step_on_a_cifar_resnet():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    _one_step_of_every_method({"name": "resnet8"}, images, np.arange(8, dtype=np.int32) % 10)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(_CIFAR_FAMILIES))
def test_every_method_takes_a_step_on_every_cifar_family(family):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % 10
    _one_step_of_every_method(_CIFAR_FAMILIES[family], images, labels)


def test_the_teacher_sees_the_students_augmented_view(digits):
    """Pad-crop-flip on: a teacher equal to the student (an MLP, no dropout or batch norm) gives
    a zero KD term only if both saw the same augmented images."""
    model = build_model({"name": "mlp", "hidden_sizes": (32,)}, num_classes=10, field="model")
    spec = build_distiller({"name": "kd"})
    state = init_distill_state(
        model,
        _tx(),
        jax.random.key(3),
        digits.train.images[:2],
        init_member(model, _tx(), jax.random.key(3), digits.train.images[:1]).frozen(),
        spec.distiller,
        _training_set(digits),
    )
    twin = init_member(model, _tx(), jax.random.key(3), digits.train.images[:1]).frozen()
    batch = next(DeviceSplit(digits.train).train_batches(BATCH, seed=0, epoch=0))
    step = functools.partial(method_distill_step, weights=_weights(spec), distiller=spec.distiller)
    _, same_view = step(state, batch, (twin,), crop_flip=(2, (0.0,)))
    assert float(same_view["kd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(same_view["teacher_agreement"]) == 1.0
    # The check can fail: an unaugmented teacher disagrees with the augmented student.
    shifted = FrozenModel(
        lambda variables, images, train: model.apply(
            variables, jnp.flip(images, axis=2), train=train
        ),
        twin.variables,
    )
    fresh = init_distill_state(
        model,
        _tx(),
        jax.random.key(3),
        digits.train.images[:2],
        twin,
        spec.distiller,
        _training_set(digits),
    )
    _, other_view = step(fresh, batch, (shifted,), crop_flip=(2, (0.0,)))
    assert float(other_view["kd"]) > 1e-3
