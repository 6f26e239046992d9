"""kdjax: knowledge distillation in JAX/Flax.

Start at :func:`kdjax.pipeline.run` (the whole job), :mod:`kdjax.losses` (the losses),
:mod:`kdjax.train.steps` (the jitted steps) and :mod:`kdjax.models` (the networks).
"""

__version__ = "0.1.0"
