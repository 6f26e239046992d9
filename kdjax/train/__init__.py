"""Train states, the jitted steps, optimizers and the epoch loop."""

from kdjax.train.evaluate import evaluate
from kdjax.train.loop import FitResult, fit
from kdjax.train.optim import make_optimizer
from kdjax.train.state import FrozenModel, TrainState, create_train_state
from kdjax.train.steps import distill_step, eval_step, train_step

__all__ = [
    "FitResult",
    "FrozenModel",
    "TrainState",
    "create_train_state",
    "distill_step",
    "eval_step",
    "evaluate",
    "fit",
    "make_optimizer",
    "train_step",
]
