"""The CIFAR-100 table configs: every pair builds and validates, and runs one step end to end on
data in CIFAR-100's real on-disk format (no copy of CIFAR can be had here)."""

import importlib.util
import pathlib

import pytest

from kdjax import zoo
from kdjax.configs.cifar100 import PAIRS
from kdjax.data.cifar import CIFAR100
from tests.test_cifar_data import write_release

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLES = ("cifar100_crd", "cifar100_dkd")


def _config(table, pair):
    spec = importlib.util.spec_from_file_location(table, ROOT / "experiments" / f"{table}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(pair)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_pair_builds_and_validates_with_the_published_recipe(table, pair):
    config = _config(table, pair)
    zoo.validate(config)
    for role in ("teacher", "student"):
        stage = config[role]
        assert (stage.epochs, stage.batch_size, stage.crop_flip_pad) == (240, 64, 4)
        assert stage.optimizer.schedule == "multistep"
        assert tuple(stage.optimizer.decay_epochs) == (150, 180, 210)
        assert stage.optimizer.weight_decay == 5e-4
    assert (config.teacher.model.name, config.student.model.name) == PAIRS[pair]
    assert set(config.published) <= {"teacher", "student_scratch", *config.methods}
    assert config.published  # every row that has a published number shows it


def test_an_unknown_pair_names_the_known_ones():
    with pytest.raises(ValueError, match="resnet56_resnet20"):
        _config("cifar100_crd", "resnet9_resnet1")


def _one_step(tmp_path, table, pair):
    write_release(tmp_path / "data", CIFAR100)
    config = _config(table, pair)
    config.dataset.raw_dir = str(tmp_path / "data")
    config.dataset.train_examples = 64  # one batch of 64: one step per stage
    config.eval_batch_size = 100
    config.results_dir = ""
    for role in ("teacher", "student"):
        config[role].epochs = 1
    if "crd" in config.methods:
        config.methods.crd.negatives = 256  # 16,384 rows x 64 examples is a GPU's work
    results = zoo.reproduce(config, str(tmp_path / "run"))
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher", "student_scratch", *config.methods]
    for row in results["rows"]:
        assert 0 <= row["mean"] <= 100  # 100 test images
    assert (tmp_path / "run" / "results.md").read_text().count("paper top-1 %") == 1
    return results


@pytest.mark.slow
def test_the_dkd_table_prints_the_published_number_beside_ours(tmp_path):
    results = _one_step(tmp_path, "cifar100_dkd", "vgg13_vgg8")
    assert results["rows"][-1]["paper_top1_pct"] == 74.68


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_table_and_pair_runs_one_step_on_cifar_format_data(tmp_path, table, pair):
    _one_step(tmp_path, table, pair)
