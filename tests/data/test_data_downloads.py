"""Tests of cnnray.data: downloads of the IDX datasets: into the default folder, checked
against their MD5, each file fetched once however many loaders ask, and the offline message (CPU only).

Every file is written here, in tmp_path, in the canonical formats (tests/helpers/data_files.py);
downloads go to a local http.server (tests/data/conftest.py).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnray.data import DataError, load_dataset
from cnnray.data import idx

from tests.helpers.data_files import STEMS, mnist_arrays, write_idx


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


def serve_mnist(root: Path, monkeypatch, name: str, mirrors: tuple[str, ...]):
    arrays = mnist_arrays(seed=3)
    write_idx(root, arrays, gz=True)
    md5 = {f"{s}.gz": hashlib.md5((root / f"{s}.gz").read_bytes()).hexdigest() for s in STEMS}
    monkeypatch.setitem(idx.MIRRORS, name, mirrors)
    monkeypatch.setitem(idx.MD5, name, md5)
    return arrays, md5


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_download_into_default_dir(http_root, closed_url, monkeypatch, tmp_path, name):
    root, url, hits = http_root
    # The first mirror is down: the second must be used.
    arrays, _ = serve_mnist(root, monkeypatch, name, (closed_url, url))
    ds = load_dataset(name)  # data_dir defaults to $CNNRAY_DATA/<name>
    target = tmp_path / "home" / name
    assert sorted(p.name for p in target.glob("*.gz")) == sorted(f"{s}.gz" for s in STEMS)
    assert np.array_equal(ds.test_images[:, 0].numpy(), arrays[STEMS[2]])
    assert sum(hits.values()) == 4
    load_dataset(name)  # present now: no new request
    assert sum(hits.values()) == 4


def test_download_rejects_wrong_md5(http_root, monkeypatch, tmp_path):
    root, url, _ = http_root
    _, md5 = serve_mnist(root, monkeypatch, "mnist", (url,))
    monkeypatch.setitem(idx.MD5, "mnist", {**md5, f"{STEMS[2]}.gz": "0" * 32})
    target = tmp_path / "dl"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", target)
    assert "MD5" in str(info.value) and f"{STEMS[2]}.gz" in str(info.value)
    left = {p.name for p in target.iterdir()}
    assert f"{STEMS[2]}.gz" not in left
    assert not [n for n in left if n.endswith(".part")]


def test_concurrent_downloads_fetch_each_file_once(http_root, monkeypatch, tmp_path):
    root, url, hits = http_root
    arrays, _ = serve_mnist(root, monkeypatch, "mnist", (url,))
    barrier = threading.Barrier(3)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(load_dataset("mnist", tmp_path / "shared", cache_dir=tmp_path / "c"))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(torch.equal(r.train_images, results[0].train_images) for r in results)
    assert dict(hits) == {f"/{s}.gz": 1 for s in STEMS}  # the lock made the others wait


def test_offline_names_files_and_place(closed_url, monkeypatch, tmp_path):
    monkeypatch.setitem(idx.MIRRORS, "mnist", (closed_url,))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path / "offline")
    message = str(info.value)
    assert all(f"{s}.gz" in message for s in STEMS)
    assert str(tmp_path / "offline") in message and "--data-dir" in message
