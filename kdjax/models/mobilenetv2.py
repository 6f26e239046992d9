"""MobileNetV2 (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks"), the CIFAR variant of the CRD (Tian et al., 2020) and DKD (Zhao et al., 2022)
CIFAR-100 tables.

Registered as ``mobilenetv2``: RepDistiller's ``mobile_half`` (expansion 6, width multiplier 0.5)
with exactly its parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from kdjax.models.cifar_resnet import (
    CONV_INIT,
    batch_norm,
    check_images,
    conv1x1,
    conv3x3,
    global_avg_pool,
)
from kdjax.models.factory import MODELS, check_widths

# (expansion, channels, blocks, first stride) per block group, from the paper's Table 2; None
# stands for the model's ``expansion``. Only the stem and the third, fourth and sixth groups
# stride, so 32x32 inputs end at 2x2.
_GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# RepDistiller reads its features after these groups (0-based): 16, 8, 4 and 2 pixels wide.
_FEATURE_GROUPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear, no ReLU); the input is
    added back when the shape is kept.

    The expanding 1x1 conv is there even at expansion 1, as in the original (the paper drops it).
    """

    features: int
    stride: int
    expansion: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        hidden = x.shape[-1] * self.expansion
        y = nn.relu(batch_norm(train, "expand_bn")(conv1x1(hidden, 1, "expand_conv")(x)))
        y = nn.Conv(
            hidden,
            (3, 3),
            strides=self.stride,
            padding=1,
            feature_group_count=hidden,  # depthwise
            use_bias=False,
            kernel_init=CONV_INIT,
            name="depthwise_conv",
        )(y)
        y = nn.relu(batch_norm(train, "depthwise_bn")(y))
        y = batch_norm(train, "project_bn")(conv1x1(self.features, 1, "project_conv")(y))
        if self.stride == 1 and x.shape[-1] == self.features:
            return x + y
        return y


@MODELS.register("mobilenetv2")
class MobileNetV2(nn.Module):
    """A stride-2 3x3 conv stem, seven groups of inverted residual blocks, a 1x1 conv to 1280
    channels, global average pooling and one linear classifier.

    Features (RepDistiller's ``is_feat`` list): ``stem`` (after the stem's conv-BN-ReLU, 16x16 on
    CIFAR), ``stage1``..``stage4`` (the outputs of block groups 1, 2, 4 and 6, counting from 0:
    16, 8, 4 and 2 pixels wide; these are linear bottlenecks, so not post-ReLU) and
    ``pre_logits`` ([batch, 1280], after the 1x1 conv-BN-ReLU and pooling).
    """

    num_classes: int
    expansion: int = 6  # the inverted residuals' expansion ratio t
    width_mult: float = 0.5  # scales every width except the last 1280 (which only grows)

    def __post_init__(self) -> None:
        check_widths("expansion", self.expansion, allow_empty=False)
        if isinstance(self.width_mult, bool) or not isinstance(self.width_mult, int | float):
            raise ValueError(f"width_mult={self.width_mult!r} must be a number")
        if int(16 * self.width_mult) < 1:
            raise ValueError(f"width_mult={self.width_mult} leaves groups without channels")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("mobilenetv2", x)
        # int() truncates as the original does (e.g. 0.5 * 24 = 12, but 0.35 * 24 -> 8).
        x = conv3x3(int(32 * self.width_mult), 2, "stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        features = {"stem": x}
        for g, (expansion, channels, blocks, stride) in enumerate(_GROUPS):
            for b in range(blocks):
                x = InvertedResidual(
                    int(channels * self.width_mult),
                    stride if b == 0 else 1,
                    self.expansion if expansion is None else expansion,
                    name=f"group{g}_block{b}",
                )(x, train=train)
            if g in _FEATURE_GROUPS:
                features[_FEATURE_GROUPS[g]] = x
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = nn.relu(batch_norm(train, "last_bn")(conv1x1(last, 1, "last_conv")(x)))
        x = global_avg_pool(x)
        features["pre_logits"] = x
        head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")
        logits = head(x)
        return logits, features
