"""CIFAR ResNets (He et al., 2016, "Deep Residual Learning for Image Recognition", sec. 4.2).

The ``resnet{8,14,20,32,44,56,110}`` and ``resnet{8,32}x4`` of the CRD paper (Tian et al., 2020,
"Contrastive Representation Distillation") and the DKD paper (Zhao et al., 2022, "Decoupled
Knowledge Distillation") CIFAR-100 tables, with exactly the parameters of RepDistiller's
``models/resnet.py``. This module also holds the few layer helpers the other CIFAR families share
(batch norm with PyTorch's settings, the convolution initialiser, global average pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.factory import MODELS, check_widths
from kdjax.models.norm import BatchNorm

# He et al.'s "fan_out" normal init (std sqrt(2 / (k*k*out_channels))), which the ResNet, WRN,
# VGG and MobileNetV2 originals all give their convolutions.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str) -> BatchNorm:
    """BatchNorm with PyTorch's defaults: flax's momentum 0.9 is PyTorch's momentum 0.1."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv3x3(features: int, stride: int, name: str, *, use_bias: bool = False) -> nn.Conv:
    """3x3 convolution padded by one pixel on every side.

    PyTorch's ``padding=1`` rather than flax's "SAME": for a stride of 2 on an even size, "SAME"
    pads only the bottom/right, which shifts every sampled window by a pixel.
    """
    return nn.Conv(
        features,
        (3, 3),
        strides=stride,
        padding=1,
        use_bias=use_bias,
        kernel_init=CONV_INIT,
        name=name,
    )


def conv1x1(features: int, stride: int, name: str) -> nn.Conv:
    """1x1 convolution without bias (every one in these nets is followed by BatchNorm)."""
    return nn.Conv(
        features,
        (1, 1),
        strides=stride,
        padding=0,
        use_bias=False,
        kernel_init=CONV_INIT,
        name=name,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[batch, h, w, c] -> [batch, c].

    The originals pool with a fixed window (8x8 for 32x32 inputs); averaging over whatever is
    left gives the same on CIFAR and lets other input sizes (28x28 Fashion-MNIST) through.
    """
    return jnp.mean(x, axis=(1, 2))


def check_images(model: str, x: jax.Array) -> None:
    """Models take NHWC images; anything else is a caller's mistake worth a clear message."""
    if x.ndim != 4:
        raise ValueError(f"{model} expects images [batch, height, width, channels], got {x.shape}")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (projected by 1x1 conv+BN when shapes differ)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nn.relu(batch_norm(train, "bn1")(conv3x3(self.features, self.stride, "conv1")(x)))
        y = batch_norm(train, "bn2")(conv3x3(self.features, 1, "conv2")(y))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            # Option B of He et al.: a learned projection, as the original uses.
            shortcut = conv1x1(self.features, self.stride, "shortcut_conv")(x)
            shortcut = batch_norm(train, "shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """A 3x3 conv stem and three stages of ``(depth - 2) / 6`` basic blocks (strides 1, 2, 2).

    ``widths`` is (stem, stage1, stage2, stage3): (16, 16, 32, 64) for the ResNets of He et al.,
    (32, 64, 128, 256) for the "x4" teachers of the CRD paper.

    Features (RepDistiller's ``is_feat`` list, post-activation): ``stem`` (after the first
    conv-BN-ReLU), ``stage1``..``stage3`` (after each stage's last ReLU; 32, 16 and 8 pixels wide
    on CIFAR) and ``pre_logits`` ([batch, widths[3]], the pooled vector).
    """

    num_classes: int
    depth: int = 20  # 6n + 2 layers: n basic blocks per stage
    widths: Sequence[int] = (16, 16, 32, 64)

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 8:
            raise ValueError(f"depth={self.depth!r} must be a whole number >= 8")
        if (self.depth - 2) % 6:
            raise ValueError(f"depth={self.depth} must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...)")
        check_widths("widths", self.widths, allow_empty=False)
        if len(self.widths) != 4:
            raise ValueError(f"widths={self.widths} must list 4 widths: stem and three stages")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("cifar resnet", x)
        blocks_per_stage = (self.depth - 2) // 6
        x = nn.relu(batch_norm(train, "stem_bn")(conv3x3(self.widths[0], 1, "stem_conv")(x)))
        features = {"stem": x}
        stages = zip(self.widths[1:], (1, 2, 2), strict=True)
        for stage, (width, stride) in enumerate(stages, start=1):
            for block in range(blocks_per_stage):
                block_stride = stride if block == 0 else 1
                name = f"stage{stage}_block{block}"
                x = BasicBlock(width, block_stride, name=name)(x, train=train)
            features[f"stage{stage}"] = x
        x = global_avg_pool(x)
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features


# The registered names: RepDistiller's constructors, each a depth and a set of widths.
_X4 = (32, 64, 128, 256)


@MODELS.register("resnet8")
class ResNet8(CifarResNet):
    depth: int = 8


@MODELS.register("resnet14")
class ResNet14(CifarResNet):
    depth: int = 14


@MODELS.register("resnet20")
class ResNet20(CifarResNet):
    depth: int = 20


@MODELS.register("resnet32")
class ResNet32(CifarResNet):
    depth: int = 32


@MODELS.register("resnet44")
class ResNet44(CifarResNet):
    depth: int = 44


@MODELS.register("resnet56")
class ResNet56(CifarResNet):
    depth: int = 56


@MODELS.register("resnet110")
class ResNet110(CifarResNet):
    depth: int = 110


@MODELS.register("resnet8x4")
class ResNet8x4(CifarResNet):
    depth: int = 8
    widths: Sequence[int] = _X4


@MODELS.register("resnet32x4")
class ResNet32x4(CifarResNet):
    depth: int = 32
    widths: Sequence[int] = _X4
