"""Tests of cnnray.data on the real files in ../shared/datasets (slow): MNIST and the
CIFAR-10 JPEG tarball load with their documented shapes, and again from the cache."""

from __future__ import annotations

import time

import pytest
import torch

from cnnray.data import load_dataset

from tests.helpers import SHARED_DATASETS as SHARED


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


@pytest.mark.slow
def test_real_mnist(tmp_path):
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"no real MNIST at {SHARED / 'mnist'}")
    start = time.perf_counter()
    ds = load_dataset("mnist", SHARED / "mnist", download=False, cache_dir=tmp_path / "c")
    first = time.perf_counter() - start
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.test_labels).tolist() == test_counts
    assert torch.bincount(ds.train_labels).tolist() == train_counts
    start = time.perf_counter()
    again = load_dataset("mnist", SHARED / "mnist", download=False, cache_dir=tmp_path / "c")
    print(f"\nMNIST: first load {first:.2f} s, cached load {time.perf_counter() - start:.2f} s")
    assert torch.equal(again.train_images, ds.train_images)


@pytest.mark.slow
def test_real_cifar10_jpg(tmp_path):
    archive = SHARED / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"no real CIFAR-10 at {archive}")
    start = time.perf_counter()
    ds = load_dataset("cifar10", archive, download=False, cache_dir=tmp_path / "c")
    first = time.perf_counter() - start
    assert ds.train_images.shape == (50000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    names = "airplane automobile bird cat deer dog frog horse ship truck"
    assert ds.classes == tuple(names.split())
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    start = time.perf_counter()
    again = load_dataset("cifar10", archive, download=False, cache_dir=tmp_path / "c")
    print(f"\nCIFAR-10 jpg: decode {first:.2f} s, cached load {time.perf_counter() - start:.2f} s")
    assert torch.equal(again.train_images, ds.train_images)
