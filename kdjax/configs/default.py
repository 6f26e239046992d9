"""The bare ``kdjax`` command: an MLP teacher and a small MLP student on the embedded digits.

Command:   kdjax --workdir runs/digits            (or: python -m kdjax)
Smoke:     kdjax --config=kdjax/configs/default.py:smoke
Wall time: about 10 s on a 2-core CPU (smoke: a few seconds).
Expected:  teacher 99.2 % test accuracy (3 errors of 360), scratch student 97.5 %, distilled
           student 98.6 % (measured on a 2-core CPU, jax 0.10.2).

scikit-learn's 1,797 real 8x8 digits need neither network nor files, so this runs anywhere.
"""

import ml_collections

from kdjax.config import dataset_config, stage_config, survival_fields


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "digits"
    config.seed = 0  # seeds initialisation, dropout and the order of batches
    config.eval_batch_size = 512
    survival_fields(config)  # checkpointing (resume) and on_nonfinite
    config.dataset = dataset_config("digits")
    config.teacher = stage_config(
        model=dict(name="mlp", hidden_sizes=(512, 512), dropout_rate=0.3, input_dropout_rate=0.1),
        epochs=60,
        batch_size=64,
        learning_rate=0.05,
        weight_decay=1e-4,
    )
    config.teacher.checkpoint = ""  # reuse a teacher: an earlier run's work directory
    config.student = stage_config(
        model=dict(name="mlp", hidden_sizes=(32,), dropout_rate=0.0, input_dropout_rate=0.0),
        epochs=60,
        batch_size=64,
        learning_rate=0.05,
    )
    config.student.temperature = 4.0  # softens both models' logits in the soft term
    config.student.alpha = 0.9  # weight of the soft term; 1 - alpha weighs the hard labels
    if variant == "smoke":
        config.teacher.epochs = config.student.epochs = 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of the default config; use '' or 'smoke'")
    return config
