"""Tests of cnnray.data: the IDX (MNIST) reader: round trips, every kind of damaged file named (CPU only).

Every file is written here, in tmp_path, in the canonical formats (tests/helpers/data_files.py);
downloads go to a local http.server (tests/data/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnray.data import DataError, load_dataset

from tests.helpers.data_files import STEMS, idx_bytes, mnist_arrays, truncate, write_idx


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = mnist_arrays()
    write_idx(tmp_path / "mnist", arrays, gz=gz)
    ds = load_dataset("mnist", tmp_path / "mnist", download=False, cache_dir=tmp_path / "c")
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (6, 1, 28, 28)
    assert ds.train_images.is_contiguous() and ds.input_shape == (1, 28, 28)
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays[STEMS[0]])
    assert np.array_equal(ds.train_labels.numpy(), arrays[STEMS[1]])
    assert np.array_equal(ds.test_images[:, 0].numpy(), arrays[STEMS[2]])
    assert np.array_equal(ds.test_labels.numpy(), arrays[STEMS[3]])
    assert ds.classes == tuple("0123456789") and ds.num_classes == 10
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    again = load_dataset("mnist", tmp_path / "mnist", download=False, cache_dir=tmp_path / "c")
    assert torch.equal(again.train_images, ds.train_images)  # from the cache this time
    fashion = load_dataset("fashion-mnist", tmp_path / "mnist", download=False)
    assert fashion.name == "fashion_mnist" and fashion.classes[9] == "Ankle boot"
    assert fashion.mean == (0.2860,)


def test_idx_plain_file_wins_over_gz(tmp_path):
    write_idx(tmp_path, mnist_arrays(seed=1), gz=True)
    plain = mnist_arrays(seed=2)
    write_idx(tmp_path, plain, gz=False)
    ds = load_dataset("mnist", tmp_path, download=False)
    assert np.array_equal(ds.train_images[:, 0].numpy(), plain[STEMS[0]])


IDX_DEFECTS = {
    # name: (how to damage the plain files, words the message must contain)
    "truncated data": (lambda d: truncate(d / STEMS[0], 2000), ["truncated", STEMS[0]]),
    "truncated header": (lambda d: truncate(d / STEMS[2], 9), ["truncated", STEMS[2]]),
    "trailing bytes": (
        lambda d: (d / STEMS[3]).write_bytes((d / STEMS[3]).read_bytes() + b"xx"),
        ["unexpected bytes", STEMS[3]],
    ),
    "bad magic": (
        lambda d: (d / STEMS[1]).write_bytes(b"\x00\x00\x08\x03" + (d / STEMS[1]).read_bytes()[4:]),
        ["magic", "0x00000803", "0x00000801", STEMS[1]],
    ),
    "not idx": (lambda d: (d / STEMS[0]).write_bytes(b"PK\x03\x04" * 10), ["magic", STEMS[0]]),
    "count mismatch": (
        lambda d: (d / STEMS[1]).write_bytes(idx_bytes(np.zeros(11, np.uint8))),
        ["12 images", "11 labels"],
    ),
    "label range": (
        lambda d: (d / STEMS[3]).write_bytes(idx_bytes(np.full(6, 10, np.uint8))),
        ["label 10", "0..9"],
    ),
}


@pytest.mark.parametrize("defect", sorted(IDX_DEFECTS))
def test_idx_defects_raise_data_error(tmp_path, defect):
    write_idx(tmp_path, mnist_arrays(), gz=False)
    damage, words = IDX_DEFECTS[defect]
    damage(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    for word in words:
        assert word in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path, mnist_arrays(), gz=True)
    gz = tmp_path / f"{STEMS[0]}.gz"
    truncate(gz, len(gz.read_bytes()) // 2)
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        load_dataset("mnist", tmp_path, download=False)


def test_idx_missing_files_named(tmp_path):
    arrays = mnist_arrays()
    write_idx(tmp_path, {k: arrays[k] for k in STEMS[:2]})
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert f"{STEMS[2]}.gz" in message and f"{STEMS[3]}.gz" in message
    assert f"{STEMS[0]}.gz" not in message
    assert str(tmp_path) in message and "--data-dir" in message and "\n" not in message
    with pytest.raises(DataError, match="missing"):
        load_dataset("mnist", tmp_path / "nowhere", download=False)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="mnist, fashion_mnist, cifar10, imagefolder"):
        load_dataset("imagenet")
