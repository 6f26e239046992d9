"""The DKD paper's CIFAR-100 rows (Zhao et al., 2022, Table 1; mdistiller) for the CRD table's
four pairs: teacher, student from scratch and DKD.

Command:   kdjax --config=experiments/cifar100_dkd.py:resnet32x4_resnet8x4 --workdir=runs/dkd
               [--config.dataset.raw_dir=PATH/TO/cifar-100-python]   # offline; omit to download
Pairs:     resnet56_resnet20, resnet32x4_resnet8x4, wrn_40_2_wrn_16_2, vgg13_vgg8
Wall time: a GPU job; the tests run each pair for one step on data in CIFAR's on-disk format.
Expected:  DKD top-1 71.97 / 76.32 / 76.24 / 74.68 (the pairs in the order above).

mdistiller's settings: CE 1, TCKD 1 (alpha), NCKD beta = 8 (2 for resnet56 -> resnet20, 6 for
wrn_40_2 -> wrn_16_2 and vgg13 -> vgg8), T = 4, the teacher terms ramped up over 20 epochs.
"""

from kdjax.configs.cifar100 import cifar100_config

# Top-1 % of the DKD row (DKD paper Table 1 / mdistiller README).
PUBLISHED_DKD = {
    "resnet56_resnet20": 71.97,
    "resnet32x4_resnet8x4": 76.32,
    "wrn_40_2_wrn_16_2": 76.24,
    "vgg13_vgg8": 74.68,
}
BETA = {"resnet56_resnet20": 2.0, "wrn_40_2_wrn_16_2": 6.0, "vgg13_vgg8": 6.0}


def get_config(pair: str = "resnet32x4_resnet8x4"):
    dkd = dict(
        name="dkd",
        temperature=4.0,
        warmup_epochs=20,
        weights=dict(ce=1.0, tckd=1.0, nckd=BETA.get(pair, 8.0)),
    )
    published = {"dkd": PUBLISHED_DKD[pair]} if pair in PUBLISHED_DKD else {}
    return cifar100_config("cifar100_dkd", pair, {"dkd": dkd}, published)
