"""The MNIST short run on Fashion-MNIST: 1200-1200 teacher, 800-800 student, T = 4.

Command:   kdjax --config=experiments/fashion_mnist_short.py --workdir=runs/fmnist_short \
               --config.dataset.raw_dir=../shared/data/fashion_mnist   # offline
Smoke:     --config=experiments/fashion_mnist_short.py:smoke
Wall time: about 2 minutes on a 2-core CPU.
Expected:  teacher ~88-89 % test accuracy, students ~88 %.
"""

from kdjax.configs import hinton_mlp


def get_config(variant: str = ""):
    config = hinton_mlp.get_config(variant, dataset="fashion_mnist")
    config.student.temperature = 4.0
    return config
