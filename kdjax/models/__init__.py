"""Teacher and student networks, found by name.

Every model is a ``flax.linen`` module called as ``model.apply(variables, x, train=...)`` that
returns ``(logits, features)``: ``features`` maps stable names (``hidden1``, ``stage1``,
``pre_logits``, ...) to intermediate activations, so feature distillers read them by name.
"""

from kdjax.models.cnn import SmallCNN
from kdjax.models.factory import MODELS, build_model, count_params, init_variables
from kdjax.models.mlp import MLP

__all__ = ["MLP", "MODELS", "SmallCNN", "build_model", "count_params", "init_variables"]
