"""Data: the embedded digits, MNIST/Fashion-MNIST built offline by TFDS, and batching."""

import gzip
import os
import shutil

import numpy as np
import pytest
from conftest import raw_dir

from kdjax.data import Dataset, DeviceSplit, Split, load_dataset
from kdjax.data.batching import epoch_order
from kdjax.data.datasets import check_dataset
from kdjax.errors import ConfigError, DataError


def test_digits_is_the_real_sklearn_set_with_a_fixed_split(digits):
    assert digits.image_shape == (8, 8, 1)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.train.images.dtype == np.float32
    assert 0.0 <= digits.train.images.min() and digits.train.images.max() == 1.0
    assert set(np.unique(digits.test.labels)) == set(range(10))
    again = load_dataset({"name": "digits"})
    np.testing.assert_array_equal(again.test.labels, digits.test.labels)


def test_mnist_through_tfds_from_raw_files(mnist):
    assert (len(mnist.train), len(mnist.test)) == (60_000, 10_000)
    assert mnist.image_shape == (28, 28, 1) and mnist.num_classes == 10
    # The well-known MNIST statistics: mean pixel 0.1307 (train); 1,135 test ones.
    assert mnist.train.images.mean() == pytest.approx(0.1307, abs=1e-4)
    assert np.sum(mnist.test.labels == 1) == 1135


@pytest.mark.slow
def test_fashion_mnist_is_not_mnist_in_a_shared_tfds_dir(mnist, tfds_data_dir):
    # TFDS caches manual-dir extractions by file name; mnist and fashion_mnist share names.
    fashion = load_dataset(
        {
            "name": "fashion_mnist",
            "raw_dir": raw_dir("fashion_mnist"),
            "tfds_data_dir": tfds_data_dir,
        }
    )
    assert len(fashion.train) == 60_000
    assert fashion.train.images.mean() == pytest.approx(0.2860, abs=1e-4)
    assert np.bincount(fashion.test.labels).tolist() == [1000] * 10


def test_missing_raw_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"dataset.raw_dir=.*is not a folder"):
        load_dataset(
            {"name": "mnist", "raw_dir": str(tmp_path / "nope"), "tfds_data_dir": str(tmp_path)}
        )


def test_raw_dir_without_the_files_names_them(tmp_path):
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte.gz"):
        load_dataset({"name": "mnist", "raw_dir": str(tmp_path), "tfds_data_dir": str(tmp_path)})


def test_corrupted_raw_files_are_refused(tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(raw_dir("mnist"), bad)
    with gzip.open(bad / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not mnist")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not mnist's"):
        load_dataset({"name": "mnist", "raw_dir": str(bad), "tfds_data_dir": str(tmp_path / "t")})
    assert not os.path.exists(tmp_path / "t" / "mnist" / "3.0.1" / "dataset_info.json")


def test_another_datasets_raw_files_are_refused_even_when_prepared(mnist, mnist_config):
    """mnist is already prepared in this TFDS folder: without the checksum check, TFDS would
    silently serve it from there, ignoring the Fashion-MNIST files given as raw_dir."""
    config = dict(mnist_config, raw_dir=raw_dir("fashion_mnist"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not mnist's"):
        load_dataset(config)


def test_offline_download_fails_at_once_naming_the_fix(tmp_path, offline):
    """No network (as here): the error comes before TFDS's minutes of retries."""
    with pytest.raises(DataError, match=r"cannot be reached from here.*set dataset.raw_dir"):
        load_dataset({"name": "fashion_mnist", "tfds_data_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_digits_refuses_data_folders_it_would_ignore():
    with pytest.raises(DataError, match="dataset.raw_dir=.*digits ships with scikit-learn"):
        load_dataset({"name": "digits", "raw_dir": "../shared/data/mnist"})


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ConfigError, match=r"dataset.name: unknown dataset 'mnsit'.*'mnist'"):
        load_dataset({"name": "mnsit"})


def _tiny(labels, num_classes=3):
    images = np.zeros((len(labels), 2, 2, 1), np.float32)
    split = Split(images, np.asarray(labels, np.int32))
    return Dataset("tiny", split, split, num_classes)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(DataError, match=r"label 7 at index 2 is outside the 3 classes"):
        check_dataset(_tiny([0, 1, 7, 2]))
    with pytest.raises(DataError, match="label -1"):
        check_dataset(_tiny([-1, 1]))


def test_empty_split_is_refused():
    with pytest.raises(DataError, match="train split is empty"):
        check_dataset(_tiny([]))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    np.testing.assert_array_equal(
        epoch_order(100, seed=3, epoch=2), epoch_order(100, seed=3, epoch=2)
    )
    assert not np.array_equal(epoch_order(100, seed=3, epoch=2), epoch_order(100, seed=3, epoch=3))
    assert sorted(epoch_order(100, seed=3, epoch=2)) == list(range(100))


def test_train_batches_follow_the_epoch_order_and_drop_the_remainder(digits):
    split = DeviceSplit(digits.train)
    batches = list(split.train_batches(100, seed=1, epoch=0))
    assert len(batches) == 14  # 1437 // 100
    order = epoch_order(1437, seed=1, epoch=0)
    np.testing.assert_array_equal(batches[3]["label"], digits.train.labels[order[300:400]])
    assert all(bool(b["mask"].all()) for b in batches)


def test_eval_batches_cover_every_example_once(digits):
    batches = list(DeviceSplit(digits.test).eval_batches(100))
    assert [int(b["mask"].sum()) for b in batches] == [100, 100, 100, 60]
    labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in batches])
    np.testing.assert_array_equal(labels, digits.test.labels)
