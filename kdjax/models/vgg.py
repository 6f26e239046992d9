"""VGG with BatchNorm (Simonyan & Zisserman, 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition"), CIFAR variant without the fully connected layers.

The ``vgg8``, ``vgg11`` and ``vgg13`` of the CRD (Tian et al., 2020) and DKD (Zhao et al., 2022)
CIFAR-100 tables: RepDistiller registers those names for its ``vgg*_bn`` constructors, so every
conv here has a bias *and* a BatchNorm, as there, to give exactly its parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from kdjax.models.cifar_resnet import batch_norm, check_images, conv3x3, global_avg_pool
from kdjax.models.factory import MODELS, check_widths

# Conv widths of the five blocks, by VGG's configuration letter ("S" is RepDistiller's 8-layer).
_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))

# Three 2x2 max-pools stand between the five blocks on 32x32 inputs, so 8x8 is the least that
# leaves at least one pixel for the last block.
_MIN_SIZE = 8


class VGG(nn.Module):
    """Five blocks of conv3x3-BN-ReLU layers; 2x2 max-pool after blocks 0, 1 and 2 (and after
    block 3 too for 64x64 inputs, as the original does for Tiny-ImageNet), then global average
    pooling and one linear classifier.

    Features (RepDistiller's ``is_feat`` list, post-activation): ``stem`` (block 0's output),
    ``stage1``..``stage4`` (blocks 1-4, before pooling; 16, 8, 4 and 4 pixels wide on CIFAR) and
    ``pre_logits`` ([batch, 512]). Takes inputs of at least 8x8 pixels (32x32, 28x28, ...).
    """

    num_classes: int
    blocks: Sequence[Sequence[int]] = _VGG8  # conv widths of each of the five blocks

    def __post_init__(self) -> None:
        if len(self.blocks) != 5:
            raise ValueError(f"blocks={self.blocks} must list the conv widths of 5 blocks")
        for i, widths in enumerate(self.blocks):
            check_widths(f"blocks[{i}]", widths, allow_empty=False)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("vgg", x)
        height, width = x.shape[1:3]
        if min(height, width) < _MIN_SIZE:
            raise ValueError(
                f"vgg takes images of at least {_MIN_SIZE}x{_MIN_SIZE} pixels "
                f"(e.g. 32x32 or 28x28), got {height}x{width}"
            )
        features = {}
        for i, widths in enumerate(self.blocks):
            # Pooling sits before blocks 1-3; before block 4 only for 64x64 inputs, so that
            # CIFAR's last two blocks both work at 4x4.
            if i in (1, 2, 3) or (i == 4 and height == 64):
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for j, w in enumerate(widths):
                # The original convs keep PyTorch's default bias even before BatchNorm.
                x = conv3x3(w, 1, f"block{i}_conv{j}", use_bias=True)(x)
                x = nn.relu(batch_norm(train, f"block{i}_bn{j}")(x))
            features["stem" if i == 0 else f"stage{i}"] = x
        x = global_avg_pool(x)
        features["pre_logits"] = x
        head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")
        logits = head(x)
        return logits, features


@MODELS.register("vgg8")
class VGG8(VGG):
    blocks: Sequence[Sequence[int]] = _VGG8


@MODELS.register("vgg11")
class VGG11(VGG):
    blocks: Sequence[Sequence[int]] = _VGG11


@MODELS.register("vgg13")
class VGG13(VGG):
    blocks: Sequence[Sequence[int]] = _VGG13
