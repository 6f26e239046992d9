"""The CIFAR-100 recipe of the CRD and DKD papers' tables, as a zoo config (``runner = "zoo"``).

Recipe (RepDistiller / mdistiller): SGD with momentum 0.9, weight decay 5e-4, batch 64, 240
epochs, learning rate 0.05 (0.01 for MobileNetV2 and ShuffleNet students) divided by 10 at
epochs 150, 180 and 210; pad-4 random crop and horizontal flip, per-channel normalisation.
The teacher is trained here with the same recipe (the papers start from teachers trained so).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from kdjax.config import dataset_config, stage_config, survival_fields

# Teacher -> student pairs of both tables.
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
}
_SMALL_LR_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def _recipe(model: str, learning_rate: float) -> ml_collections.ConfigDict:
    return stage_config(
        model=dict(name=model),
        epochs=240,
        batch_size=64,
        crop_flip_pad=4,  # pad 4, random 32x32 crop, random horizontal flip
        learning_rate=learning_rate,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="multistep",
        decay_epochs=(150, 180, 210),
        decay_factor=0.1,
    )


def attention_stages(model: str) -> tuple[str, ...]:
    """The stages attention transfer pairs (RepDistiller: every stage between stem and pool)."""
    return (
        ("stage1", "stage2", "stage3", "stage4")
        if model.startswith("vgg")
        else (
            "stage1",
            "stage2",
            "stage3",
        )
    )


def cifar100_config(
    name: str,
    pair: str,
    methods: Mapping[str, Mapping],
    published: Mapping[str, float],
) -> ml_collections.ConfigDict:
    """A zoo config for ``pair`` (a key of :data:`PAIRS`) with ``methods`` (row -> distiller
    section) and the ``published`` top-1 accuracies (row -> %) shown beside ours."""
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; use one of {', '.join(PAIRS)}")
    teacher, student = PAIRS[pair]
    config = ml_collections.ConfigDict()
    config.runner = "zoo"
    config.name = f"{name}_{pair}"
    config.seeds = (0,)  # the papers report one run per row (mean of several in the DKD paper)
    config.results_dir = "experiments/results"
    config.eval_batch_size = 500
    survival_fields(config)
    config.dataset = dataset_config("cifar100")
    config.teacher = _recipe(teacher, 0.05)
    config.teacher.checkpoint = ""
    student_lr = 0.01 if student in _SMALL_LR_STUDENTS else 0.05
    config.student = _recipe(student, student_lr)
    config.methods = ml_collections.ConfigDict({k: dict(v) for k, v in methods.items()})
    config.published = ml_collections.ConfigDict(dict(published))  # top-1 %, the paper's
    return config
