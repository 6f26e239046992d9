"""The CRD paper's CIFAR-100 table (Tian et al., 2020, Table 1; RepDistiller), one teacher ->
student pair per run: teacher, student from scratch, KD, FitNet, AT and CRD.

Command:   kdjax --config=experiments/cifar100_crd.py:resnet32x4_resnet8x4 --workdir=runs/crd
               [--config.dataset.raw_dir=PATH/TO/cifar-100-python]   # offline; omit to download
Pairs:     resnet56_resnet20, resnet32x4_resnet8x4, wrn_40_2_wrn_16_2, vgg13_vgg8
Wall time: a GPU job (240 epochs x 6 models); not run on this 2-core CPU, where the tests run
           each pair for one step on data in CIFAR's on-disk format.
Expected:  the published top-1 accuracies beside each row (results.md, "paper" column).

Loss weights as RepDistiller's scripts give them: KD 0.1 CE + 0.9 KD at T = 4; FitNet 1 CE +
100 hint on stage 2 (RepDistiller's hint layer 2); AT 1 CE + 1000 AT over every stage; CRD
1 CE + 0.8 CRD (16,384 negatives, tau 0.07, momentum 0.5, 128-d embeddings). Left out:
FitNets' 30-epoch hint-only pre-training of RepDistiller's implementation (kdjax trains the
hint and the labels together from the start).
"""

from kdjax.configs.cifar100 import PAIRS, attention_stages, cifar100_config

# Top-1 % (CRD paper Table 1 / RepDistiller README): teacher, scratch, KD, FitNet, AT, CRD.
PUBLISHED = {
    "resnet56_resnet20": (72.34, 69.06, 70.66, 69.21, 70.55, 71.16),
    "resnet32x4_resnet8x4": (79.42, 72.50, 73.33, 73.50, 73.44, 75.51),
    "wrn_40_2_wrn_16_2": (75.61, 73.26, 74.92, 73.58, 74.08, 75.48),
    "vgg13_vgg8": (74.64, 70.36, 72.98, 71.02, 71.43, 73.94),
}
ROWS = ("teacher", "student_scratch", "kd", "fitnet", "at", "crd")


def get_config(pair: str = "resnet32x4_resnet8x4"):
    teacher, student = PAIRS.get(pair, ("", ""))
    methods = dict(
        kd=dict(name="kd", temperature=4.0, weights=dict(ce=0.1, kd=0.9)),
        fitnet=dict(
            name="fitnet",
            student_feature="stage2",
            teacher_feature="stage2",
            weights=dict(ce=1.0, hint=100.0),
        ),
        at=dict(
            name="at",
            student_features=attention_stages(student),
            teacher_features=attention_stages(teacher),
            weights=dict(ce=1.0, at=1000.0),
        ),
        crd=dict(name="crd", negatives=16384, weights=dict(ce=1.0, crd=0.8)),
    )
    published = dict(zip(ROWS, PUBLISHED.get(pair, ()), strict=False))
    return cifar100_config("cifar100_crd", pair, methods, published)
