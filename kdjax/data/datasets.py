"""The dataset registry and the checks every dataset passes before training starts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kdjax.errors import DataError
from kdjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Split:
    """One split as host arrays: ``images`` float32 ``[n, height, width, channels]`` (in [0, 1],
    or normalised per channel where the dataset says so: CIFAR),
    ``labels`` int32 ``[n]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        """The examples at ``index`` (integers or a boolean mask), in that order."""
        return Split(self.images[index], self.labels[index])

    def with_classes(self, *, keep: Sequence[int] = (), drop: Sequence[int] = ()) -> Split:
        """Only the examples of the classes in ``keep`` (all if empty), minus those in ``drop``:
        Hinton et al.'s transfer sets without 3s, or of only 7s and 8s."""
        chosen = np.isin(self.labels, keep) if keep else np.ones(len(self), bool)
        return self.take(chosen & ~np.isin(self.labels, drop))


def validation_indices(num_examples: int, num_validation: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed carve-out of ``num_validation`` of ``num_examples``: (kept, held out), sorted.

    It depends only on the two sizes, never on a run's seed, so every run and every seed of a
    config is validated on the same examples and none of them trains on them.
    """
    if not 0 < num_validation < num_examples:
        raise DataError(
            f"validation_examples={num_validation} must be between 1 and {num_examples - 1} "
            f"(the training split has {num_examples} examples)."
        )
    order = np.random.default_rng(num_examples).permutation(num_examples)
    return np.sort(order[num_validation:]), np.sort(order[:num_validation])


def split_off_validation(train: Split, num_validation: int) -> tuple[Split, Split]:
    """``train`` less a fixed :func:`validation_indices` carve-out: (rest, validation)."""
    kept, held_out = validation_indices(len(train), num_validation)
    return train.take(kept), train.take(held_out)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    validation: Split | None = None  # carved from the training data when the config asks
    # The per-channel value a zero (black) raw pixel has after the dataset's normalisation:
    # what augmentation pads with, so that normalising before augmenting equals padding the
    # raw pixels with 0. None means 0 (images left in [0, 1]).
    padding_value: tuple[float, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


# A loader takes the ``dataset`` config section and returns a Dataset.
DATASETS: Registry[Callable[[Mapping[str, Any]], Dataset]] = Registry("dataset")


def load_dataset(dataset_config: Mapping[str, Any]) -> Dataset:
    """Loads ``dataset_config["name"]`` and checks it (non-empty, labels in range, shapes)."""
    loader = DATASETS.get(dataset_config["name"], field="dataset.name")
    dataset = loader(dataset_config)
    check_dataset(dataset)
    num_validation = dataset_config.get("validation_examples", 0)
    if num_validation:
        train, validation = split_off_validation(dataset.train, num_validation)
        dataset = dataclasses.replace(dataset, train=train, validation=validation)
    num_train = dataset_config.get("train_examples", 0)
    if num_train:
        index = balanced_subset(dataset.train.labels, num_train, dataset.num_classes)
        dataset = dataclasses.replace(dataset, train=dataset.train.take(index))
    return dataset


def balanced_subset(labels: np.ndarray, size: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` examples, ``size / num_classes`` of each class (the first
    ``size % num_classes`` classes one more), drawn without replacement by a fixed ``seed``:
    the same subset for every run and every population member of a config."""
    if not 0 < size <= len(labels):
        raise DataError(
            f"train_examples={size} must be between 1 and the {len(labels)} training examples."
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        want = size // num_classes + (cls < size % num_classes)
        members = np.flatnonzero(labels == cls)
        if want > len(members):
            raise DataError(
                f"train_examples={size} needs {want} examples of class {cls}, which has only "
                f"{len(members)}: ask for fewer."
            )
        chosen.append(rng.choice(members, want, replace=False))
    return np.sort(np.concatenate(chosen))


def check_dataset(dataset: Dataset) -> None:
    """Raises :class:`DataError` for data no model could train on."""
    for split_name in ("train", "test"):
        split: Split = getattr(dataset, split_name)
        where = f"dataset {dataset.name!r}, {split_name} split"
        if len(split) == 0:
            raise DataError(f"{where} is empty: check the data folder or dataset name.")
        if split.images.shape[0] != split.labels.shape[0]:
            raise DataError(
                f"{where} has {split.images.shape[0]} images but {split.labels.shape[0]} labels."
            )
        if split.images.ndim != 4:
            raise DataError(
                f"{where}: images must be [n, height, width, channels], "
                f"got shape {split.images.shape}."
            )
        bad = (split.labels < 0) | (split.labels >= dataset.num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{where}: label {int(split.labels[first])} at index {first} is outside the "
                f"{dataset.num_classes} classes [0, {dataset.num_classes}); {int(bad.sum())} "
                "labels are out of range. Fix the labels or the dataset's number of classes."
            )
    if dataset.train.images.shape[1:] != dataset.test.images.shape[1:]:
        raise DataError(
            f"dataset {dataset.name!r}: train images {dataset.train.images.shape[1:]} "
            f"and test images {dataset.test.images.shape[1:]} differ in shape."
        )


def images_to_float(images: np.ndarray, max_value: float) -> np.ndarray:
    """Scales integer pixels to float32 in [0, 1] and adds a channel axis if there is none."""
    images = np.asarray(images, dtype=np.float32) / np.float32(max_value)
    return images[..., None] if images.ndim == 3 else images


# Registering the built-in loaders is a side effect of importing their modules.
from kdjax.data import cifar, digits, tfds_source  # noqa: E402, F401
