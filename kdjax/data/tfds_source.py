"""MNIST and Fashion-MNIST through tensorflow-datasets, online or from raw files on disk.

With ``dataset.raw_dir`` unset, TFDS downloads and prepares the dataset as usual. With it set
to a folder holding the four original IDX files, TFDS's own builder prepares the *same* dataset
from them (they are its manual download directory), so no download is attempted. Either way the
prepared dataset lives in ``dataset.tfds_data_dir`` (TFDS's default when unset) and later runs
reuse it.

TensorFlow is imported here only, once, to read the prepared splits into numpy arrays; the
training loop never touches it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax.data.datasets import DATASETS, Dataset, Split, images_to_float
from kdjax.errors import DataError

logger = logging.getLogger(__name__)

# The four files of the original MNIST-format release, as TFDS's builders expect them.
RAW_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def check_raw_dir(raw_dir: str, dataset_name: str) -> None:
    """Raises :class:`DataError` unless ``raw_dir`` holds the four IDX files."""
    field = "dataset.raw_dir"
    if not os.path.isdir(raw_dir):
        raise DataError(
            f"{field}={raw_dir!r} is not a folder. Point it to the folder holding the "
            f"{dataset_name} files {', '.join(RAW_FILES)}, or unset it to let TFDS download."
        )
    missing = [f for f in RAW_FILES if not os.path.isfile(os.path.join(raw_dir, f))]
    if missing:
        raise DataError(
            f"{field}={raw_dir!r} lacks {', '.join(missing)}. It must hold the original "
            f"{dataset_name} IDX files (gzip'd, names unchanged)."
        )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_raw_files_match(builder: Any, raw_dir: str, dataset_name: str) -> None:
    """Raises :class:`DataError` unless the files in ``raw_dir`` are the ones TFDS records for
    ``dataset_name`` (its checksums). Caught here, another dataset's folder would be ignored
    when TFDS has prepared ``dataset_name`` before, or fail deep inside TFDS when not."""
    expected = {
        os.path.basename(urllib.parse.urlparse(url).path): info.checksum
        for url, info in (builder.url_infos or {}).items()
    }
    for name in RAW_FILES:
        if name in expected and _sha256(os.path.join(raw_dir, name)) != expected[name]:
            raise DataError(
                f"dataset.raw_dir={raw_dir!r}: {name} is not {dataset_name}'s (its SHA-256 "
                f"differs from the one TFDS records for {dataset_name}). Point raw_dir to the "
                f"original, unmodified {dataset_name} files."
            )


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")

# How to do without a download, for the datasets whose raw files are IDX files.
IDX_OFFLINE_FIX = (
    f"set dataset.raw_dir to a folder of the original IDX .gz files ({', '.join(RAW_FILES)})"
)


def check_download_possible(
    builder: Any, dataset_name: str, *, offline_fix: str = IDX_OFFLINE_FIX
) -> None:
    """Fails at once, rather than after minutes of TFDS's retries, when the download hosts'
    names cannot even be resolved (no network). Behind a proxy the proxy resolves them, so
    nothing is checked. ``offline_fix`` says how to do without the network."""
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES):
        return
    hosts = {urllib.parse.urlparse(url).hostname for url in (builder.url_infos or {})}
    for host in sorted(h for h in hosts if h):
        try:
            socket.getaddrinfo(host, None)
        except OSError as err:
            raise DataError(
                f"TFDS would download {dataset_name} from {host}, which cannot be reached from "
                f"here ({err}). Without network access, {offline_fix}."
            ) from err


def _import_tfds():
    # TensorFlow must not claim accelerator memory that JAX will need.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return tfds


def load_tfds_images(
    name: str, dataset_config: Mapping[str, Any], *, offline_fix: str = IDX_OFFLINE_FIX
) -> Dataset:
    """Prepares (once) and reads a TFDS image-classification dataset into numpy arrays, images
    scaled to [0, 1]. ``offline_fix`` says how to do without the network."""
    raw_dir = dataset_config.get("raw_dir") or None
    data_dir = dataset_config.get("tfds_data_dir") or None
    if raw_dir is not None:
        raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
        check_raw_dir(raw_dir, name)
    tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    download_dir = None
    if raw_dir is not None:
        check_raw_files_match(builder, raw_dir, name)
    elif not builder.is_prepared():
        check_download_possible(builder, name, offline_fix=offline_fix)
    if raw_dir is not None:
        download_config = tfds.download.DownloadConfig(manual_dir=raw_dir)
        source = f"the raw files in {raw_dir}"
        # TFDS caches files extracted from a manual dir under their bare names, so mnist and
        # fashion_mnist (same file names) would silently share one cache: give each its own.
        root = os.path.dirname(os.path.dirname(builder.data_dir))  # <root>/<name>/<version>
        download_dir = os.path.join(root, "downloads", f"manual_{name}")
    else:
        download_config = None
        source = "a TFDS download"
    try:
        if not builder.is_prepared():
            logger.info("Preparing TFDS %s in %s from %s (once).", name, builder.data_dir, source)
        builder.download_and_prepare(download_dir=download_dir, download_config=download_config)
    except Exception as err:  # TFDS raises many types; all mean the same to the user.
        hint = (
            "check that they are the original, unmodified files"
            if raw_dir
            else f"without network access, {offline_fix}"
        )
        raise DataError(
            f"TFDS could not prepare {name!r} from {source}: {err}. Fix: {hint}."
        ) from err
    splits = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        )
        splits[split] = Split(images_to_float(images, 255.0), labels.astype(np.int32))
    return Dataset(
        name=name,
        train=splits["train"],
        test=splits["test"],
        num_classes=builder.info.features["label"].num_classes,
    )


@DATASETS.register("mnist")
def load_mnist(dataset_config: Mapping[str, Any]) -> Dataset:
    return load_tfds_images("mnist", dataset_config)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(dataset_config: Mapping[str, Any]) -> Dataset:
    return load_tfds_images("fashion_mnist", dataset_config)
