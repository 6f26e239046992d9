"""Shared fixtures: real data from ../shared/data, prepared through TFDS once per session."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def raw_dir(name: str) -> str:
    """The folder of original IDX files for ``name``; required in CI, skipped elsewhere."""
    path = SHARED_DATA / name
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real {name} files in {path}")
        pytest.skip(f"no {name} raw files in {path}")
    return str(path)


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def mnist_config(tfds_data_dir):
    return {"name": "mnist", "raw_dir": raw_dir("mnist"), "tfds_data_dir": tfds_data_dir}


@pytest.fixture(scope="session")
def mnist(mnist_config):
    from kdjax.data import load_dataset

    return load_dataset(mnist_config)


@pytest.fixture(scope="session")
def digits():
    from kdjax.data import load_dataset

    return load_dataset({"name": "digits"})


@pytest.fixture
def offline(monkeypatch):
    """No network, as on this machine wherever it is not already so: DNS fails, no proxies."""
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for variable in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(variable.upper(), raising=False)
