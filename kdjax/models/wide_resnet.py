"""Wide ResNets (Zagoruyko & Komodakis, 2016, "Wide Residual Networks"), CIFAR variant.

The ``wrn_{16,40}_{1,2}`` of the CRD (Tian et al., 2020) and DKD (Zhao et al., 2022) CIFAR-100
tables, with exactly the parameters of RepDistiller's ``models/wrn.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from kdjax.models.cifar_resnet import (
    batch_norm,
    check_images,
    conv1x1,
    conv3x3,
    global_avg_pool,
)
from kdjax.models.factory import MODELS, check_rate, check_widths


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus a shortcut.

    When the width or stride changes, the shortcut is a 1x1 conv of the *activated* input (the
    BN-ReLU is then shared by both branches); otherwise it is the raw input, as in the original.
    """

    features: int
    stride: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        activated = nn.relu(batch_norm(train, "bn1")(x))
        y = conv3x3(self.features, self.stride, "conv1")(activated)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv3x3(self.features, 1, "conv2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            return conv1x1(self.features, self.stride, "shortcut_conv")(activated) + y
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 conv (16 channels), three groups of ``(depth - 4) / 6`` pre-activation
    blocks of widths 16k, 32k and 64k (strides 1, 2, 2), then BN-ReLU and global average pooling.

    Features (RepDistiller's ``is_feat`` list): ``stem`` (the first conv's output; the original
    has no BN-ReLU there, as the net is pre-activation), ``stage1``..``stage3`` (each group's
    output, i.e. the residual sum *before* the next BN-ReLU, as RepDistiller returns it; 32, 16
    and 8 pixels wide on CIFAR) and ``pre_logits`` ([batch, 64k], after the final BN-ReLU and
    pooling).
    """

    num_classes: int
    depth: int = 16  # 6n + 4 layers: n blocks per group
    widen_factor: int = 1  # k
    dropout_rate: float = 0.0  # between a block's two convs, during training only (0 in CRD/DKD)

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 10:
            raise ValueError(f"depth={self.depth!r} must be a whole number >= 10")
        if (self.depth - 4) % 6:
            raise ValueError(f"depth={self.depth} must be 6n + 4 (10, 16, 22, 28, 40, ...)")
        check_widths("widen_factor", self.widen_factor, allow_empty=False)
        check_rate("dropout_rate", self.dropout_rate)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("wide resnet", x)
        blocks_per_group = (self.depth - 4) // 6
        x = conv3x3(16, 1, "stem_conv")(x)
        features = {"stem": x}
        widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
        for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            for block in range(blocks_per_group):
                x = WideBlock(
                    width,
                    stride if block == 0 else 1,
                    self.dropout_rate,
                    name=f"stage{stage}_block{block}",
                )(x, train=train)
            features[f"stage{stage}"] = x
        x = global_avg_pool(nn.relu(batch_norm(train, "final_bn")(x)))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features


@MODELS.register("wrn_16_1")
class WRN16x1(WideResNet):
    depth: int = 16
    widen_factor: int = 1


@MODELS.register("wrn_16_2")
class WRN16x2(WideResNet):
    depth: int = 16
    widen_factor: int = 2


@MODELS.register("wrn_40_1")
class WRN40x1(WideResNet):
    depth: int = 40
    widen_factor: int = 1


@MODELS.register("wrn_40_2")
class WRN40x2(WideResNet):
    depth: int = 40
    widen_factor: int = 2
