"""Base config: Hinton et al.'s MNIST nets (1200-1200 teacher, 800-800 student), briefly trained.

Experiments in ``experiments/`` start from :func:`get_config` and override what differs.
"""

import ml_collections

from kdjax.config import dataset_config, stage_config, survival_fields


def get_config(variant: str = "", dataset: str = "mnist") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = f"{dataset}_short"
    config.seed = 0
    config.eval_batch_size = 1000
    survival_fields(config)  # checkpointing (resume) and on_nonfinite
    config.dataset = dataset_config(dataset)
    config.teacher = stage_config(
        model=dict(name="mlp", hidden_sizes=(1200, 1200), dropout_rate=0.5, input_dropout_rate=0.2),
        epochs=10,
        batch_size=128,
        learning_rate=0.1,
    )
    config.teacher.checkpoint = ""
    config.student = stage_config(
        model=dict(name="mlp", hidden_sizes=(800, 800), dropout_rate=0.0, input_dropout_rate=0.0),
        epochs=6,
        batch_size=128,
        learning_rate=0.1,
        # At T = 20 the soft term's gradient is about (s - t) / classes per logit: against a
        # trained teacher's large logits, a fresh student at full learning rate diverges (seen:
        # 10 % accuracy). A linear warm-up over ~1 epoch avoids that.
        warmup_steps=500,
    )
    config.student.temperature = 20.0  # the paper's temperature for the 800-800 student
    config.student.alpha = 0.9
    if variant == "smoke":
        config.teacher.epochs = config.student.epochs = 1
        config.student.optimizer.warmup_steps = 100
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
    return config
