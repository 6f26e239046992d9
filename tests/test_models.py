"""Models: registry, (logits, features) outputs, parameter counts, config errors."""

import jax
import numpy as np
import pytest

from kdjax.errors import ConfigError
from kdjax.models import MODELS, build_model, count_params, init_variables


def _build(**model):
    return build_model(model, num_classes=10, field="teacher.model")


def test_hinton_mlps_have_the_papers_parameter_counts():
    images = np.zeros((2, 28, 28, 1), np.float32)
    teacher = _build(name="mlp", hidden_sizes=(1200, 1200), dropout_rate=0.5)
    student = _build(name="mlp", hidden_sizes=(800, 800))
    # 784*1200+1200 + 1200*1200+1200 + 1200*10+10, and likewise for 800.
    assert count_params(init_variables(teacher, jax.random.key(0), images)["params"]) == 2_395_210
    assert count_params(init_variables(student, jax.random.key(0), images)["params"]) == 1_276_810


def test_mlp_returns_logits_and_named_features():
    model = _build(name="mlp", hidden_sizes=(16, 8))
    images = np.ones((4, 8, 8, 1), np.float32)
    variables = init_variables(model, jax.random.key(0), images)
    logits, features = model.apply(variables, images, train=False)
    assert logits.shape == (4, 10)
    assert set(features) == {"hidden1", "hidden2", "pre_logits"}
    assert features["hidden1"].shape == (4, 16)
    np.testing.assert_array_equal(features["pre_logits"], features["hidden2"])


def test_cnn_features_and_batch_stats():
    model = _build(name="cnn", channels=(4, 8), dense_size=16)
    images = np.ones((3, 28, 28, 1), np.float32)
    variables = init_variables(model, jax.random.key(0), images)
    assert "batch_stats" in variables
    logits, features = model.apply(variables, images, train=False)
    assert logits.shape == (3, 10)
    assert features["stage1"].shape == (3, 28, 28, 4)
    assert features["stage2"].shape == (3, 14, 14, 8)
    assert features["pre_logits"].shape == (3, 16)


def test_dropout_only_in_training():
    model = _build(name="mlp", hidden_sizes=(64,), dropout_rate=0.5)
    images = np.ones((2, 8, 8, 1), np.float32)
    variables = init_variables(model, jax.random.key(0), images)
    eval1, _ = model.apply(variables, images, train=False)
    eval2, _ = model.apply(variables, images, train=False)
    train, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(eval1, eval2)
    assert not np.allclose(eval1, train)


def test_registry_lists_models():
    assert {"mlp", "cnn"} <= set(MODELS.names())


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"teacher.model.name: unknown model 'mpl'.*'mlp'"):
        _build(name="mpl")


def test_unknown_model_field_names_the_field():
    with pytest.raises(ConfigError, match=r"teacher.model.hiden_sizes.*'hidden_sizes'"):
        _build(name="mlp", hiden_sizes=(10,))


def test_declared_classes_must_match_the_data():
    with pytest.raises(ConfigError, match=r"teacher.model.num_classes=100.*10 classes"):
        _build(name="mlp", num_classes=100)
