"""Hinton et al.'s MNIST nets, trained briefly: 1200-1200 teacher, 800-800 student, T = 20.

Command:   kdjax --config=experiments/mnist_short.py --workdir=runs/mnist_short \
               --config.dataset.raw_dir=../shared/data/mnist      # offline; omit to download
Smoke:     --config=experiments/mnist_short.py:smoke (1 epoch each, ~30 s)
Wall time: about 80 seconds on a 2-core CPU (plus ~25 s, once, for TFDS to prepare MNIST).
Expected:  teacher under 200 test errors (of 10,000); scratch and distilled students ~98 %.

A short run, not the paper's table: the paper trains far longer, with weight constraints and
jittered inputs (the reproduction is experiments/hinton2015_mnist.py).
"""

from kdjax.configs import hinton_mlp


def get_config(variant: str = ""):
    return hinton_mlp.get_config(variant, dataset="mnist")
