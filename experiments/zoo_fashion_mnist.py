"""The distiller zoo on Fashion-MNIST: a CNN teacher, an ensemble of 3, a teacher assistant, a
small CNN student, and every registered method, 3 seeds of each trained side by side.

Command:   kdjax --config=experiments/zoo_fashion_mnist.py --workdir=runs/zoo_fashion_mnist \
               --config.dataset.raw_dir=../shared/data/fashion_mnist   # offline; omit to download
Smoke:     --config=experiments/zoo_fashion_mnist.py:smoke (digits, tiny nets, 1-2 minutes)
Wall time: see experiments/results/zoo_fashion_mnist.md (measured on a 2-core CPU).

Every method runs at its published loss weights (RepDistiller / mdistiller, CIFAR-100), none
tuned here; the small-scale choices, fixed before the run: SGD momentum 0.9, weight decay
5e-4, cosine schedule, batch 128; KD and DKD at T = 4; DKD's 20-of-240-epoch warm-up scaled to
this run's length (1 of 6 epochs); CRD with 1,024 negatives instead of 16,384 (a 2-core CPU gathers
16,384 x 128 memory rows per example too slowly) and the paper's other settings.
"""

import ml_collections

from kdjax.config import dataset_config, stage_config, survival_fields

TEACHER = dict(name="cnn", channels=(16, 32), dense_size=64, batch_norm=True)
ASSISTANT = dict(name="cnn", channels=(8, 16), dense_size=32, batch_norm=True)
STUDENT = dict(name="cnn", channels=(4, 8), dense_size=16, batch_norm=True)
SGD = dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def _methods(student_epochs: int) -> ml_collections.ConfigDict:
    """Row name -> ``student.distiller`` section (weights default to the published ones)."""
    return ml_collections.ConfigDict(
        dict(
            kd=dict(name="kd", temperature=4.0),
            fitnet=dict(name="fitnet", student_feature="stage2", teacher_feature="stage2"),
            at=dict(
                name="at",
                student_features=("stage1", "stage2"),
                teacher_features=("stage1", "stage2"),
            ),
            dkd=dict(name="dkd", temperature=4.0, warmup_epochs=max(1, student_epochs // 12)),
            rkd=dict(name="rkd"),
            pkt=dict(name="pkt"),
            sp=dict(name="sp", student_feature="stage2", teacher_feature="stage2"),
            crd=dict(name="crd", negatives=1024),
        )
    )


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.runner = "zoo"  # kdjax.zoo
    config.name = "zoo_fashion_mnist"
    config.seeds = (0, 1, 2)  # one teacher and one student of every row per seed
    config.results_dir = "experiments/results"  # where <name>.json / .md are published
    config.eval_batch_size = 1000
    survival_fields(config)
    # 15,000 of the 60,000 training images (1,500 per class, a fixed draw): what lets 14
    # populations of CNNs train in under an hour on 2 CPU cores. All 10,000 test images.
    config.dataset = dataset_config("fashion_mnist", train_examples=15_000)
    config.teacher = stage_config(model=TEACHER, epochs=8, batch_size=128, **SGD)
    config.teacher.checkpoint = ""  # unused: the teachers are cached in the work directory
    config.assistant = stage_config(model=ASSISTANT, epochs=6, batch_size=128, **SGD)
    config.student = stage_config(model=STUDENT, epochs=6, batch_size=128, **SGD)
    config.methods = _methods(config.student.epochs)
    # The seeds' teachers as one ensemble teaching every student (averaged probabilities).
    config.ensemble_method = ml_collections.ConfigDict(dict(name="kd", temperature=4.0))
    # TAKD: teacher -> assistant -> student, both steps with this distiller.
    config.takd_method = ml_collections.ConfigDict(dict(name="kd", temperature=4.0))
    if variant == "smoke":
        config.name = "zoo_smoke"
        config.results_dir = ""
        config.seeds = (0, 1)
        config.dataset = dataset_config("digits")  # embedded: no files needed
        # 8x8 digits leave the 4-8 channel student 2x2 maps: wider nets, a few more epochs.
        config.assistant.model = dict(ASSISTANT, channels=(12, 24), dense_size=48)
        config.student.model = dict(STUDENT, channels=(8, 16), dense_size=32)
        for role in ("teacher", "assistant", "student"):
            config[role].epochs = 4
            config[role].batch_size = 64
        config.methods = _methods(4)
        config.methods.crd.negatives = 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
    return config
