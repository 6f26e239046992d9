"""Teacher and student networks, found by name.

Every model is a ``flax.linen`` module called as ``model.apply(variables, x, train=...)`` that
returns ``(logits, features)``: ``features`` maps stable names (``hidden1``, ``stage1``,
``pre_logits``, ...) to intermediate activations, so feature distillers read them by name.

Importing this package registers every model: the small ``mlp`` and ``cnn``, and the CIFAR
benchmark nets of the CRD and DKD tables (``resnet*``, ``wrn_*``, ``vgg*``, ``mobilenetv2``,
``shufflenetv1``, ``shufflenetv2``).
"""

from kdjax.models.cifar_resnet import CifarResNet
from kdjax.models.cnn import SmallCNN
from kdjax.models.factory import MODELS, build_model, count_params, init_variables
from kdjax.models.mlp import MLP
from kdjax.models.mobilenetv2 import MobileNetV2
from kdjax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from kdjax.models.vgg import VGG
from kdjax.models.wide_resnet import WideResNet

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "CifarResNet",
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "count_params",
    "init_variables",
]
