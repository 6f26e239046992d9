"""A small CNN teacher (with batch norm) distilled into an MLP student, on the embedded digits.

Command:   kdjax --config=experiments/digits_cnn.py --workdir=runs/digits_cnn
Smoke:     --config=experiments/digits_cnn.py:smoke
Wall time: about 30 s on a 2-core CPU.
Expected:  teacher ~98-99 %, students ~96-98 % (360 test digits).
"""

import ml_collections

from kdjax.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = default.get_config(variant)
    config.name = "digits_cnn"
    config.teacher.model = ml_collections.ConfigDict(
        dict(name="cnn", channels=(32, 64), dense_size=128, batch_norm=True, dropout_rate=0.2)
    )
    config.teacher.optimizer.learning_rate = 0.02
    return config
