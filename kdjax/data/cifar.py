"""CIFAR-10 and CIFAR-100, from the python-pickle release on disk or through tensorflow-datasets.

With ``dataset.raw_dir`` set, it names the unpacked ``cifar-10-python.tar.gz`` (the folder
``cifar-10-batches-py``) or ``cifar-100-python.tar.gz`` (``cifar-100-python``), or the folder
that holds it; the batches are read directly, without TensorFlow, and ``dataset.tfds_data_dir``
is not used. With it unset, TFDS downloads and prepares the dataset in ``dataset.tfds_data_dir``
as for MNIST (failing at once when offline).

Either way the images become float32 ``[n, 32, 32, 3]`` normalised per channel, once, on the
host: ``(pixel / 255 - mean) / std`` with the usual constants. The dataset's ``padding_value``
is a black pixel after that normalisation, so random crops padded with it are exactly those of
the PyTorch recipe (pad the raw image with 0, crop, flip, then normalise).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.data.datasets import DATASETS, Dataset, Split, images_to_float
from kdjax.data.tfds_source import load_tfds_images
from kdjax.errors import DataError

_IMAGE_SHAPE_CHW = (3, 32, 32)  # one row of b"data": the red plane, then green, then blue


@dataclasses.dataclass(frozen=True)
class Release:
    """What one CIFAR dataset's python release holds and how it is normalised."""

    name: str  # kdjax's and TFDS's name
    folder: str  # the folder the archive unpacks to
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes  # the key of the labels in each pickled dict
    num_classes: int
    mean: tuple[float, float, float]  # per channel (RGB), of pixels scaled to [0, 1]
    std: tuple[float, float, float]


CIFAR10 = Release(
    name="cifar10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = Release(
    name="cifar100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def normalise(images: np.ndarray, release: Release) -> np.ndarray:
    """``(images - mean) / std`` per channel for float32 ``images`` in [0, 1], in place."""
    images -= np.asarray(release.mean, np.float32)
    images /= np.asarray(release.std, np.float32)
    return images


def padding_value(release: Release) -> tuple[float, ...]:
    """A black pixel after :func:`normalise` (computed by it, so the two agree to the bit)."""
    return tuple(float(v) for v in normalise(np.zeros(3, np.float32), release))


def _raw_dir_hint(release: Release) -> str:
    return (
        f"set dataset.raw_dir to the folder {release.folder} unpacked from {release.archive} "
        "(or to the folder holding it)"
    )


def release_folder(raw_dir: str, release: Release) -> str:
    """The folder of ``release``'s files: ``raw_dir`` itself or its ``release.folder``.

    Raises :class:`DataError` naming what is missing and what ``raw_dir`` should be.
    """
    field = f"dataset.raw_dir={raw_dir!r}"
    if not os.path.isdir(raw_dir):
        raise DataError(f"{field} is not a folder. To fix, {_raw_dir_hint(release)}.")
    nested = os.path.join(raw_dir, release.folder)
    folder = nested if os.path.isdir(nested) else raw_dir
    files = (*release.train_files, release.test_file)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"{field}: {folder} lacks {', '.join(missing)}. {release.name} needs the python "
            f"release's files {', '.join(files)} (names unchanged): {_raw_dir_hint(release)}."
        )
    return folder


# Everything a CIFAR batch's pickle may build besides dicts, lists, strings and numbers: numpy
# arrays, as numpy 1 (the original files) or numpy 2 pickles them.
_ALLOWED_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{package}.multiarray", "_reconstruct"),
        (f"{package}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Refuses any other object, so no code in a stray pickle runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, not a numpy array")
        return super().find_class(module, name)


def read_batch(path: str, release: Release) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: uint8 images ``[n, 32, 32, 3]`` and int32 labels ``[n]``."""
    expected = (
        f"a pickled dict with b'data' (uint8 [n, 3072]) and b{release.label_key.decode()!r} "
        f"(n labels), as in {release.archive}"
    )
    try:
        with open(path, "rb") as f:
            # The original files were pickled by Python 2: their strings are bytes.
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data, labels = batch[b"data"], np.asarray(batch[release.label_key])
    except Exception as err:  # unpickling raises many types; all mean "not a CIFAR batch"
        raise DataError(
            f"dataset.raw_dir: {path} is not a {release.name} batch ({type(err).__name__}: "
            f"{err}). Expected {expected}."
        ) from err
    size = int(np.prod(_IMAGE_SHAPE_CHW))
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == size
        and labels.shape == (data.shape[0],)
        and np.issubdtype(labels.dtype, np.integer)
    ):
        shape = getattr(data, "shape", None)
        raise DataError(
            f"dataset.raw_dir: {path} holds data of shape {shape} and dtype "
            f"{getattr(data, 'dtype', type(data).__name__)} with labels of shape "
            f"{labels.shape}. Expected {expected}."
        )
    images = np.ascontiguousarray(data.reshape(-1, *_IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int32)


def _split_from_files(folder: str, files: tuple[str, ...], release: Release) -> Split:
    batches = [read_batch(os.path.join(folder, f), release) for f in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return Split(normalise(images_to_float(images, 255.0), release), labels)


def load_cifar(release: Release, dataset_config: Mapping[str, Any]) -> Dataset:
    """``release`` from ``dataset.raw_dir`` if set, else through TFDS; normalised either way."""
    raw_dir = dataset_config.get("raw_dir") or None
    if raw_dir is not None:
        folder = release_folder(os.path.abspath(os.path.expanduser(raw_dir)), release)
        train = _split_from_files(folder, release.train_files, release)
        test = _split_from_files(folder, (release.test_file,), release)
    else:
        tfds_config = {"tfds_data_dir": dataset_config.get("tfds_data_dir") or ""}
        loaded = load_tfds_images(release.name, tfds_config, offline_fix=_raw_dir_hint(release))
        train, test = (
            Split(normalise(split.images, release), split.labels)
            for split in (loaded.train, loaded.test)
        )
    return Dataset(
        name=release.name,
        train=train,
        test=test,
        num_classes=release.num_classes,
        padding_value=padding_value(release),
    )


@DATASETS.register("cifar10")
def load_cifar10(dataset_config: Mapping[str, Any]) -> Dataset:
    return load_cifar(CIFAR10, dataset_config)


@DATASETS.register("cifar100")
def load_cifar100(dataset_config: Mapping[str, Any]) -> Dataset:
    return load_cifar(CIFAR100, dataset_config)
