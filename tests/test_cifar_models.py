"""CIFAR benchmark models: exact parameter counts, feature names and shapes, other input sizes.

Shapes are checked through ``jax.eval_shape``, which traces a model without compiling it: jitting
``init`` costs 5-20 s per model on a 2-core CPU (over 3 minutes for all 19), tracing under 2 s.
Real forward passes run on one small model per family here, and on every model with ``-m slow``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from kdjax.errors import ConfigError
from kdjax.models import MODELS, build_model, count_params, init_variables

# Parameter counts of the PyTorch originals, HobbitLong/RepDistiller models/*.py, built with
# num_classes=100 (the names on the left are ours; RepDistiller's own are resnet*, wrn_*,
# vgg8_bn/vgg11_bn/vgg13_bn, which its model_dict registers as vgg8/vgg11/vgg13, mobile_half,
# ShuffleV1 and ShuffleV2). Measured with torch 2.13 (CPU) as
# sum(p.numel() for p in net.parameters()): weights and biases of convs, linears and BatchNorms,
# without BatchNorm running statistics (flax keeps those in batch_stats, not params).
PYTORCH_PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}


def _pyramid(stem: tuple, *stages: tuple, pre_logits: int) -> dict[str, tuple]:
    shapes = {"stem": stem} | {f"stage{i}": s for i, s in enumerate(stages, start=1)}
    return shapes | {"pre_logits": (pre_logits,)}


# Feature shapes (without the batch axis) on 32x32x3 inputs: those of RepDistiller's
# ``is_feat=True`` lists, NCHW turned NHWC, in the same order.
_RESNET = _pyramid((32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), pre_logits=64)
_RESNET_X4 = _pyramid((32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), pre_logits=256)
_WRN_2 = _pyramid((32, 32, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), pre_logits=128)
_VGG = _pyramid((32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), pre_logits=512)
FEATURE_SHAPES = {
    **dict.fromkeys(["resnet8", "resnet14", "resnet20", "resnet32", "resnet44"], _RESNET),
    **dict.fromkeys(["resnet56", "resnet110", "wrn_16_1", "wrn_40_1"], _RESNET),
    "resnet8x4": _RESNET_X4,
    "resnet32x4": _RESNET_X4,
    "wrn_16_2": _WRN_2,
    "wrn_40_2": _WRN_2,
    "vgg8": _VGG,
    "vgg11": _VGG,
    "vgg13": _VGG,
    "mobilenetv2": _pyramid(
        (16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160), pre_logits=1280
    ),
    "shufflenetv1": _pyramid((32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960), pre_logits=960),
    "shufflenetv2": _pyramid(
        (32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464), pre_logits=1024
    ),
}
SMALLEST_PER_FAMILY = ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"]
CIFAR = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
FASHION_MNIST = np.random.default_rng(1).uniform(size=(2, 28, 28, 1)).astype(np.float32)


def _build(name: str, num_classes: int = 100, **fields):
    return build_model({"name": name, **fields}, num_classes=num_classes, field="model")


@functools.cache
def _variable_shapes(name: str) -> dict:
    """The shapes ``init_variables`` gives on CIFAR inputs, traced once per model."""
    return jax.eval_shape(functools.partial(init_variables, _build(name)), jax.random.key(0), CIFAR)


def _output_shapes(model, variables, images, *, train: bool):
    def forward(variables, images):
        if train:
            return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, images, train=False)

    logits, features = jax.eval_shape(forward, variables, images)
    return logits.shape, {name: f.shape for name, f in features.items()}


def _some_variables(shapes: dict) -> dict:
    """Finite He-scaled weights of the given shapes, made with numpy.

    JAX's random initialisers compile once per shape, several seconds per model on a CPU; the
    forward-pass checks only need some well-scaled numbers.
    """
    rng = np.random.default_rng(0)

    def make(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(scale=np.sqrt(2.0 / fan_in), size=leaf.shape).astype(np.float32)
        filler = np.ones if kind in ("scale", "var") else np.zeros  # BN scale/var; biases, means
        return filler(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def test_every_cifar_model_is_registered():
    assert set(PYTORCH_PARAM_COUNTS) <= set(MODELS.names())
    assert set(FEATURE_SHAPES) == set(PYTORCH_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PYTORCH_PARAM_COUNTS))
def test_parameter_count_equals_the_pytorch_original(name):
    assert count_params(_variable_shapes(name)["params"]) == PYTORCH_PARAM_COUNTS[name]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(PYTORCH_PARAM_COUNTS))
def test_logits_and_named_features_on_cifar(name, train):
    logits, features = _output_shapes(_build(name), _variable_shapes(name), CIFAR, train=train)
    assert logits == (2, 100)
    expected = {feature: (2, *shape) for feature, shape in FEATURE_SHAPES[name].items()}
    assert features == expected


@pytest.mark.parametrize("name", SMALLEST_PER_FAMILY)
def test_fashion_mnist_sized_inputs(name):
    model = _build(name, num_classes=10)
    variables = jax.eval_shape(
        functools.partial(init_variables, model), jax.random.key(0), FASHION_MNIST
    )
    logits, features = _output_shapes(model, variables, FASHION_MNIST, train=False)
    assert logits == (2, 10)
    assert features["pre_logits"] == (2, FEATURE_SHAPES[name]["pre_logits"][0])
    assert set(features) == set(FEATURE_SHAPES[name])


def _check_forward(name, model, variables):
    eval_logits, features = model.apply(variables, CIFAR, train=False)
    assert list(features) == list(FEATURE_SHAPES[name])  # stem, stage1, ..., in network order
    (train_logits, _), updates = model.apply(variables, CIFAR, train=True, mutable=["batch_stats"])
    assert np.isfinite(eval_logits).all() and np.isfinite(train_logits).all()
    assert all(np.isfinite(f).all() for f in features.values())
    # Training normalises with the batch's statistics and moves the running ones. Every running
    # variance moves (from 1 towards the batch's); a mean may rightly stay 0: a 1x1 conv of a fresh
    # BatchNorm's training output (zero mean in every channel) has zero mean too.
    assert not np.allclose(eval_logits, train_logits)
    new_and_old = zip(
        jax.tree_util.tree_leaves_with_path(updates["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    )
    for (path, new), old in new_and_old:
        if path[-1].key == "var":
            assert not np.allclose(new, old), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_forward_pass_numbers(name):
    _check_forward(name, _build(name), _some_variables(_variable_shapes(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PYTORCH_PARAM_COUNTS))
def test_forward_pass_numbers_with_real_init(name):
    model = _build(name)
    _check_forward(name, model, init_variables(model, jax.random.key(0), CIFAR))


def test_vgg_refuses_images_too_small_to_pool():
    model = _build("vgg8")
    tiny = np.zeros((1, 7, 7, 1), np.float32)
    with pytest.raises(ValueError, match=r"at least 8x8 pixels .* got 7x7"):
        jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0), tiny)


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("resnet8", {"depth": 9}, r"depth=9 must be 6n \+ 2"),
        ("wrn_16_1", {"depth": 18}, r"depth=18 must be 6n \+ 4"),
        ("vgg8", {"blocks": [[64], [128]]}, r"5 blocks"),
        ("shufflenetv2", {"stage_widths": [116, 231, 464]}, r"must be even"),
    ],
)
def test_bad_architecture_fields_are_config_errors(name, fields, message):
    with pytest.raises(ConfigError, match=message):
        _build(name, **fields)


def test_fields_can_be_overridden_from_a_config():
    # Config lists arrive as lists; the factory turns them into (hashable) tuples.
    model = _build("resnet8", widths=[8, 8, 16, 32])
    shapes = jax.eval_shape(
        functools.partial(init_variables, model), jax.random.key(0), FASHION_MNIST
    )
    _, features = _output_shapes(model, shapes, FASHION_MNIST, train=False)
    assert features["stage3"] == (2, 7, 7, 32)
