"""CIFAR-10/100 from files in the release's own pickle format, through TFDS's mock, and the
pad-crop-flip augmentation."""

import functools
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.config import dataset_config
from kdjax.data import load_dataset
from kdjax.data.augment import random_crop_flip
from kdjax.data.cifar import CIFAR10, CIFAR100
from kdjax.errors import DataError

PER_BATCH = 2  # images per class in each written batch


def _rows(images_nhwc: np.ndarray) -> np.ndarray:
    """Images as the release stores them: one row of 3,072 bytes, red plane first."""
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072)


def _write(path, data, labels, label_key, protocol=2, extra=None):
    batch = {b"batch_label": b"a kdjax test batch", b"data": data, label_key: labels.tolist()}
    with open(path, "wb") as f:
        pickle.dump(batch | (extra or {}), f, protocol=protocol)


def _random_split(rng, release, copies):
    labels = np.tile(np.arange(release.num_classes), copies)
    return rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels


def _black_but_one(h, w, c):
    """A test image, built directly in the release's row layout: black but pixel (h, w, c)."""
    row = np.zeros(3072, np.uint8)
    row[c * 1024 + h * 32 + w] = 255
    return row


def write_release(root: pathlib.Path, release, seed=0):
    """Writes ``release``'s folder under ``root``; returns (train, test) uint8 images, labels.
    The first test image is :func:`_black_but_one` (3, 17, 2)."""
    rng = np.random.default_rng(seed)
    # The original files come from Python 2 (protocol 2); numpy 2 pickles arrays differently
    # at protocol 5, which a re-pickled copy may use.
    protocol = 2 if release is CIFAR10 else pickle.HIGHEST_PROTOCOL
    folder = root / release.folder
    folder.mkdir(parents=True)
    train_parts = []
    for name in release.train_files:
        images, labels = _random_split(rng, release, PER_BATCH)
        coarse = {b"coarse_labels": (labels // 5).tolist()} if release is CIFAR100 else {}
        _write(folder / name, _rows(images), labels, release.label_key, protocol, coarse)
        train_parts.append((images, labels))
    test_images, test_labels = _random_split(rng, release, 1)
    test_rows = _rows(test_images)
    test_rows[0] = _black_but_one(3, 17, 2)
    test_images[0] = test_rows[0].reshape(3, 32, 32).transpose(1, 2, 0)
    _write(folder / release.test_file, test_rows, test_labels, release.label_key, protocol)
    train = tuple(np.concatenate(parts) for parts in zip(*train_parts, strict=True))
    return train, (test_images, test_labels)


def _normalised(images_uint8, release):
    mean, std = np.float32(release.mean), np.float32(release.std)
    return (images_uint8.astype(np.float32) / np.float32(255.0) - mean) / std


@pytest.mark.parametrize("release", [CIFAR10, CIFAR100], ids=lambda r: r.name)
def test_raw_release_loads_normalised_nhwc_with_its_labels(tmp_path, release):
    (train_images, train_labels), (test_images, test_labels) = write_release(tmp_path, release)
    dataset = load_dataset({"name": release.name, "raw_dir": str(tmp_path / release.folder)})
    assert dataset.num_classes == release.num_classes and dataset.image_shape == (32, 32, 3)
    assert len(dataset.train) == release.num_classes * PER_BATCH * len(release.train_files)
    assert dataset.train.images.dtype == np.float32 and dataset.train.labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.train.labels, train_labels)
    np.testing.assert_array_equal(dataset.test.labels, test_labels)
    np.testing.assert_allclose(dataset.train.images, _normalised(train_images, release), atol=1e-6)
    np.testing.assert_allclose(dataset.test.images, _normalised(test_images, release), atol=1e-6)


@pytest.mark.parametrize("release", [CIFAR10, CIFAR100], ids=lambda r: r.name)
def test_a_placed_pixel_lands_at_its_height_width_channel(tmp_path, release):
    write_release(tmp_path, release)
    image = load_dataset({"name": release.name, "raw_dir": str(tmp_path)}).test.images[0]
    black = np.asarray(
        [(0.0 - m) / s for m, s in zip(release.mean, release.std, strict=True)], np.float32
    )
    expected = np.broadcast_to(black, (32, 32, 3)).copy()
    expected[3, 17, 2] = (1.0 - release.mean[2]) / release.std[2]
    np.testing.assert_allclose(image, expected, rtol=1e-6)


@pytest.mark.parametrize("release", [CIFAR10, CIFAR100], ids=lambda r: r.name)
def test_padding_value_is_a_black_pixel_after_normalisation(tmp_path, release):
    write_release(tmp_path, release)
    dataset = load_dataset({"name": release.name, "raw_dir": str(tmp_path)})
    expected = [-m / s for m, s in zip(release.mean, release.std, strict=True)]
    assert dataset.padding_value == pytest.approx(expected, rel=1e-6)
    # Bit for bit what the loader made of the black pixels, so padding equals black raw pixels.
    np.testing.assert_array_equal(dataset.test.images[0, 0, 0], dataset.padding_value)


def test_the_config_path_with_validation_keeps_padding_value(tmp_path):
    write_release(tmp_path, CIFAR100)
    config = dataset_config("cifar100", raw_dir=str(tmp_path), validation_examples=50)
    dataset = load_dataset(config)
    assert (len(dataset.train), len(dataset.validation)) == (150, 50)
    assert dataset.padding_value == pytest.approx([-1.8971, -1.8974, -1.5963], abs=1e-4)


def test_missing_raw_dir_names_the_folder_to_unpack(tmp_path):
    with pytest.raises(
        DataError, match=r"is not a folder.*cifar-10-batches-py unpacked from cifar-10-python"
    ):
        load_dataset({"name": "cifar10", "raw_dir": str(tmp_path / "nope")})


def test_raw_dir_without_the_files_names_the_missing_ones(tmp_path):
    with pytest.raises(DataError, match=r"lacks data_batch_1, data_batch_2, .*test_batch"):
        load_dataset({"name": "cifar10", "raw_dir": str(tmp_path)})
    write_release(tmp_path, CIFAR10)
    os.remove(tmp_path / CIFAR10.folder / "data_batch_4")
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_4\. "):
        load_dataset({"name": "cifar10", "raw_dir": str(tmp_path)})
    # CIFAR-10's folder is no CIFAR-100.
    with pytest.raises(DataError, match=r"lacks train, test\. cifar100 needs"):
        load_dataset({"name": "cifar100", "raw_dir": str(tmp_path / CIFAR10.folder)})


def test_wrong_content_is_refused_saying_what_is_expected(tmp_path):
    write_release(tmp_path, CIFAR10)
    path = tmp_path / CIFAR10.folder / "test_batch"
    _write(path, np.zeros((4, 1024), np.uint8), np.zeros(4, int), b"labels")  # grey, 32x32
    with pytest.raises(DataError, match=r"test_batch holds data of shape \(4, 1024\).*uint8"):
        load_dataset({"name": "cifar10", "raw_dir": str(tmp_path)})
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"test_batch is not a cifar10 batch.*b'data'"):
        load_dataset({"name": "cifar10", "raw_dir": str(tmp_path)})


class _Touch:
    """A pickle that, if loaded blindly, would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickle_asking_for_code_is_refused_unrun(tmp_path):
    write_release(tmp_path, CIFAR100)
    marker = tmp_path / "ran"
    with open(tmp_path / CIFAR100.folder / "test", "wb") as f:
        pickle.dump({b"data": _Touch(marker), b"fine_labels": [0]}, f)
    with pytest.raises(DataError, match=r"asks for pathlib.*not a numpy array"):
        load_dataset({"name": "cifar100", "raw_dir": str(tmp_path)})
    assert not marker.exists()


@pytest.fixture(scope="module")
def tfds():
    from kdjax.data.tfds_source import _import_tfds

    return _import_tfds()


@pytest.mark.parametrize("release", [CIFAR10, CIFAR100], ids=lambda r: r.name)
def test_tfds_path_converts_as_the_raw_path_does(tmp_path, tfds, release):
    num_examples = 6
    # mock_data needs the split sizes (batch_size=-1 reads them) from written metadata.
    builder = tfds.builder(release.name, data_dir=str(tmp_path))
    sizes = [
        tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0)
        for s in ("train", "test")
    ]
    builder.info.set_splits(tfds.core.SplitDict(sizes))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path)):
        dataset = load_dataset({"name": release.name, "tfds_data_dir": str(tmp_path)})
        images, labels = tfds.as_numpy(
            tfds.builder(release.name).as_dataset(split="test", batch_size=-1, as_supervised=True)
        )
    assert dataset.num_classes == release.num_classes and dataset.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(dataset.test.labels, labels)
    np.testing.assert_allclose(dataset.test.images, _normalised(images, release), atol=1e-6)
    assert dataset.padding_value == pytest.approx(
        [-m / s for m, s in zip(release.mean, release.std, strict=True)], rel=1e-6
    )


def test_offline_tfds_download_fails_at_once_naming_the_raw_folder(tmp_path, offline):
    with pytest.raises(
        DataError, match=r"cannot be reached.*raw_dir to the folder cifar-100-python unpacked"
    ):
        load_dataset({"name": "cifar100", "tfds_data_dir": str(tmp_path)})


# -- random_crop_flip --------------------------------------------------------------------------

FILL = (-1.5, -2.5, -3.5)


def _padded(image, pad, fill):
    h, w, c = image.shape
    out = np.empty((h + 2 * pad, w + 2 * pad, c), image.dtype)
    out[...] = np.asarray(fill, image.dtype)
    out[pad : pad + h, pad : pad + w] = image
    return out


def _matches(image, out, pad, fill):
    """Every (dy, dx, flipped) whose window of the padded image, maybe mirrored, is ``out``."""
    padded = _padded(image, pad, fill)
    h, w = image.shape[:2]
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + h, dx : dx + w]
            found += [
                (dy, dx, flip)
                for flip in (False, True)
                if np.array_equal(out, window[:, ::-1] if flip else window)
            ]
    return found


def _distinct_images(n, h=6, w=5, c=3):
    # Positive and all different, so no window of one image equals another window or the fill.
    return np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c) + 1.0


def test_random_crop_flip_is_a_window_of_the_padded_image_maybe_mirrored():
    images = _distinct_images(96)
    out = np.asarray(random_crop_flip(jnp.asarray(images), jax.random.key(0), pad=2, fill=FILL))
    assert out.shape == images.shape
    seen = set()
    for image, crop in zip(images, out, strict=True):
        matches = _matches(image, crop, 2, FILL)
        assert len(matches) == 1, "each output is exactly one window, mirrored or not"
        seen.add(matches[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 18  # most of the 25 offsets in 96 draws
    assert {flip for _, _, flip in seen} == {False, True}
    # The border is the fill, channel by channel, wherever the window leaves the image.
    corners = out[:, 0, 0]
    at_border = (corners < 0).all(axis=1)
    assert at_border.any() and (corners[at_border] == np.asarray(FILL, np.float32)).all()


def test_random_crop_flip_is_a_jittable_pure_function_of_its_key():
    images = jnp.asarray(_distinct_images(16))
    crop = functools.partial(random_crop_flip, pad=4, fill=FILL)
    a = crop(images, jax.random.key(1))
    np.testing.assert_array_equal(a, jax.jit(crop)(images, jax.random.key(1)))
    assert not np.array_equal(a, crop(images, jax.random.key(2)))
    # One value for all channels is the same as that value per channel.
    np.testing.assert_array_equal(
        random_crop_flip(images, jax.random.key(3), fill=0.5),
        random_crop_flip(images, jax.random.key(3), fill=(0.5, 0.5, 0.5)),
    )


def test_without_padding_it_only_flips_about_half_of_the_images():
    images = np.random.default_rng(0).random((4000, 4, 4, 1), dtype=np.float32)
    out = np.asarray(random_crop_flip(jnp.asarray(images), jax.random.key(4), pad=0))
    flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    unchanged = np.all(out == images, axis=(1, 2, 3))
    assert (flipped ^ unchanged).all(), "each image is itself or its mirror"
    assert flipped.mean() == pytest.approx(0.5, abs=0.04)
