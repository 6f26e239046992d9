"""ShuffleNet V1 (Zhang et al., 2018, "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices") and V2 (Ma et al., 2018, "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design"), CIFAR variants.

Registered as ``shufflenetv1`` and ``shufflenetv2``: RepDistiller's ``ShuffleV1`` (3 groups) and
``ShuffleV2`` (1x), the students of the CRD (Tian et al., 2020) and DKD (Zhao et al., 2022)
CIFAR-100 tables, with exactly their parameters. For CIFAR both replace ImageNet's stride-2 3x3
stem and max-pool with a 1x1 conv at full resolution, so 32x32 inputs end at 4x4.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.cifar_resnet import batch_norm, check_images, global_avg_pool
from kdjax.models.factory import MODELS, check_widths

# The originals keep PyTorch's default conv init (kaiming_uniform with a=sqrt(5)), which is a
# uniform draw of variance 1 / (3 fan_in).
_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_STEM_WIDTH = 24


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """Interleaves the channels of ``groups`` groups, so the next grouped conv mixes them.

    Channel c = g * (C / groups) + i moves to i * groups + g, as the original's
    view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4) does in NCHW.
    """
    *spatial, channels = x.shape
    x = x.reshape(*spatial, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*spatial, channels)


def _conv(features: int, kernel: int, name: str, *, stride: int = 1, groups: int = 1) -> nn.Conv:
    # Every conv here is followed by BatchNorm, so none has a bias; 3x3s pad 1 like PyTorch.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=kernel // 2,
        feature_group_count=groups,
        use_bias=False,
        kernel_init=_CONV_INIT,
        name=name,
    )


def _stem(x: jax.Array, train: bool) -> jax.Array:
    return nn.relu(batch_norm(train, "stem_bn")(_conv(_STEM_WIDTH, 1, "stem_conv")(x)))


class ShuffleV1Block(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, depthwise 3x3-BN-ReLU, grouped 1x1-BN, then ReLU of
    the sum with the input (stride 1) or of the concatenation with the input's 3x3 average pool
    (stride 2, where the convs only make ``features - input channels`` new channels).

    Unlike the paper, a ReLU follows the depthwise conv, as in the original code.
    """

    features: int
    stride: int
    groups: int
    group_first_conv: bool = True  # the paper leaves the first block's input (24 ch.) ungrouped

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = self.features - (x.shape[-1] if self.stride == 2 else 0)
        mid = out // 4
        first_groups = self.groups if self.group_first_conv else 1
        y = nn.relu(batch_norm(train, "bn1")(_conv(mid, 1, "conv1", groups=first_groups)(x)))
        y = channel_shuffle(y, first_groups)
        y = _conv(mid, 3, "conv2", stride=self.stride, groups=mid)(y)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = batch_norm(train, "bn3")(_conv(out, 1, "conv3", groups=self.groups)(y))
        if self.stride == 2:
            # count_include_pad (flax's and PyTorch's default): border windows divide by 9.
            pooled = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            return nn.relu(jnp.concatenate([y, pooled], axis=-1))
        return nn.relu(y + x)


@MODELS.register("shufflenetv1")
class ShuffleNetV1(nn.Module):
    """A 1x1 conv stem (24 channels) and three stages, each opening with a stride-2 block, then
    global average pooling and one linear classifier.

    Features (RepDistiller's ``is_feat`` list, post-activation): ``stem`` (after the stem's
    conv-BN-ReLU, 32x32 on CIFAR), ``stage1``..``stage3`` (each stage's output: 16, 8 and 4
    pixels wide) and ``pre_logits`` ([batch, stage_widths[2]]).
    """

    num_classes: int
    stage_widths: Sequence[int] = (240, 480, 960)  # output channels of each stage
    stage_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3  # of the grouped 1x1 convs

    def __post_init__(self) -> None:
        check_widths("stage_widths", self.stage_widths, allow_empty=False)
        check_widths("stage_blocks", self.stage_blocks, allow_empty=False)
        check_widths("groups", self.groups, allow_empty=False)
        if len(self.stage_widths) != 3 or len(self.stage_blocks) != 3:
            raise ValueError("stage_widths and stage_blocks must each list 3 stages")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("shufflenetv1", x)
        x = _stem(x, train)
        features = {"stem": x}
        for s, (width, blocks) in enumerate(
            zip(self.stage_widths, self.stage_blocks, strict=True), start=1
        ):
            for b in range(blocks):
                x = ShuffleV1Block(
                    width,
                    2 if b == 0 else 1,
                    self.groups,
                    group_first_conv=(s, b) != (1, 0),
                    name=f"stage{s}_block{b}",
                )(x, train=train)
            features[f"stage{s}"] = x
        x = global_avg_pool(x)
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features


class ShuffleV2Block(nn.Module):
    """Keeps the first half of the channels and runs the second half through 1x1-BN-ReLU,
    depthwise 3x3-BN, 1x1-BN-ReLU; concatenates the halves and shuffles them (2 groups)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        half = x.shape[-1] // 2
        kept, y = x[..., :half], x[..., half:]
        width = y.shape[-1]
        y = nn.relu(batch_norm(train, "bn1")(_conv(width, 1, "conv1")(y)))
        y = batch_norm(train, "bn2")(_conv(width, 3, "conv2", groups=width)(y))
        y = nn.relu(batch_norm(train, "bn3")(_conv(width, 1, "conv3")(y)))
        return channel_shuffle(jnp.concatenate([kept, y], axis=-1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Halves the resolution: two stride-2 branches on the whole input, each giving half of
    ``features`` channels (left: depthwise 3x3-BN, 1x1-BN-ReLU; right: 1x1-BN-ReLU, depthwise
    3x3-BN, 1x1-BN-ReLU), concatenated and shuffled (2 groups)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        mid = self.features // 2
        width = x.shape[-1]
        left = batch_norm(train, "left_bn1")(
            _conv(width, 3, "left_conv1", stride=2, groups=width)(x)
        )
        left = nn.relu(batch_norm(train, "left_bn2")(_conv(mid, 1, "left_conv2")(left)))
        right = nn.relu(batch_norm(train, "right_bn1")(_conv(mid, 1, "right_conv1")(x)))
        right = batch_norm(train, "right_bn2")(
            _conv(mid, 3, "right_conv2", stride=2, groups=mid)(right)
        )
        right = nn.relu(batch_norm(train, "right_bn3")(_conv(mid, 1, "right_conv3")(right)))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


@MODELS.register("shufflenetv2")
class ShuffleNetV2(nn.Module):
    """A 1x1 conv stem (24 channels), three stages of a down-sampling block and
    ``stage_blocks[i]`` basic blocks, a 1x1 conv-BN-ReLU to ``last_width``, global average
    pooling and one linear classifier.

    Features (RepDistiller's ``is_feat`` list, post-activation): ``stem`` (after the stem's
    conv-BN-ReLU, 32x32 on CIFAR), ``stage1``..``stage3`` (each stage's output: 16, 8 and 4 pixels
    wide) and ``pre_logits`` ([batch, last_width], after the last 1x1 conv and pooling).
    """

    num_classes: int
    stage_widths: Sequence[int] = (116, 232, 464)  # the 1x net; every width must be even
    stage_blocks: Sequence[int] = (3, 7, 3)  # basic blocks after each stage's down-sampling one
    last_width: int = 1024

    def __post_init__(self) -> None:
        check_widths("stage_widths", self.stage_widths, allow_empty=False)
        check_widths("stage_blocks", self.stage_blocks, allow_empty=False)
        check_widths("last_width", self.last_width, allow_empty=False)
        if len(self.stage_widths) != 3 or len(self.stage_blocks) != 3:
            raise ValueError("stage_widths and stage_blocks must each list 3 stages")
        if any(w % 2 for w in self.stage_widths):
            raise ValueError(f"stage_widths={self.stage_widths} must be even (split in halves)")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_images("shufflenetv2", x)
        x = _stem(x, train)
        features = {"stem": x}
        for s, (width, blocks) in enumerate(
            zip(self.stage_widths, self.stage_blocks, strict=True), start=1
        ):
            x = ShuffleV2DownBlock(width, name=f"stage{s}_down")(x, train=train)
            for b in range(blocks):
                x = ShuffleV2Block(name=f"stage{s}_block{b}")(x, train=train)
            features[f"stage{s}"] = x
        x = _conv(self.last_width, 1, "last_conv")(x)
        x = global_avg_pool(nn.relu(batch_norm(train, "last_bn")(x)))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, name="head")(x)
        return logits, features
