"""Tests of cnnray.data: the CIFAR-10 python batches: every layout and pickle style, foreign
globals refused, damaged files named, the download (CPU only).

Every file is written here, in tmp_path, in the canonical formats (tests/helpers/data_files.py);
downloads go to a local http.server (tests/data/conftest.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cnnray.data import DataError, load_dataset
from cnnray.data import cifar

from tests.helpers.data_files import truncate, write_tar


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


def cifar_batches(per_batch: int = 3, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    batches = {
        name: {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        }
        for name in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)
    }
    batches[cifar.META] = {b"label_names": [c.encode() for c in cifar.CLASSES]}
    return batches


def _py2_str(b: bytes) -> bytes:  # Python 2 str opcodes: SHORT_BINSTRING / BINSTRING
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + len(b).to_bytes(4, "little") + b


def _py2(v) -> bytes:
    """Protocol-2 opcodes as Python 2 (which pickled the canonical files) wrote them."""
    if isinstance(v, bytes):
        return _py2_str(v)
    if isinstance(v, int):
        return b"J" + v.to_bytes(4, "little", signed=True)
    if isinstance(v, list):
        return b"](" + b"".join(_py2(x) for x in v) + b"e"
    if isinstance(v, dict):
        return b"}(" + b"".join(_py2(k) + _py2(x) for k, x in v.items()) + b"u"
    assert isinstance(v, np.ndarray) and v.dtype == np.uint8
    dtype = b"cnumpy\ndtype\n(" + _py2_str(b"u1") + b"K\x00K\x01tR(K\x03" + _py2_str(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    shape = b"(" + b"".join(_py2(int(d)) for d in v.shape) + b"t"
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00t" + _py2_str(b"b")
        + b"tR(K\x01" + shape + dtype + b"\x89" + _py2_str(v.tobytes()) + b"tb"
    )


def pickle_batch(batch: dict, style: str) -> bytes:
    if style == "py2":
        return b"\x80\x02" + _py2(batch) + b"."
    if style == "py3":  # a Python 3 default pickle (protocol 5) with str keys
        return pickle.dumps({k.decode(): v for k, v in batch.items()})
    return pickle.dumps(batch, protocol=2)


def write_batches(directory: Path, batches: dict[str, dict], style: str = "p2") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (directory / name).write_bytes(pickle_batch(batch, style))

def check_cifar(ds, batches) -> None:
    train = [batches[n] for n in cifar.TRAIN_BATCHES]
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    expected = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    assert np.array_equal(ds.train_images.numpy(), expected)
    assert ds.train_labels.tolist() == sum((b[b"labels"] for b in train), [])
    assert ds.test_labels.tolist() == batches[cifar.TEST_BATCH][b"labels"]
    assert ds.classes == cifar.CLASSES and ds.mean == cifar.MEAN and ds.std == cifar.STD


@pytest.mark.parametrize("layout", ["subdir", "flat", "py2", "py3", "tar_path", "tar_in_dir"])
def test_cifar_batches(tmp_path, layout):
    batches = cifar_batches()
    src = tmp_path / "src" / cifar.BATCH_DIR
    style = layout if layout in ("py2", "py3") else "p2"
    write_batches(src if layout != "flat" else tmp_path / "src", batches, style)
    path = tmp_path / "src"
    if layout.startswith("tar"):
        path = tmp_path / "tar"
        path.mkdir()
        write_tar(path / cifar.ARCHIVE, src, cifar.BATCH_DIR)
        path = path / cifar.ARCHIVE if layout == "tar_path" else path
    check_cifar(load_dataset("cifar10", path, download=False), batches)


def test_cifar_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    batches = cifar_batches()
    write_batches(tmp_path / "d", batches)
    (tmp_path / "d" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    write_tar(tmp_path / "evil.tar.gz", tmp_path / "d", cifar.BATCH_DIR)
    for path in (tmp_path / "d", tmp_path / "evil.tar.gz"):
        with pytest.raises(DataError, match=r"data_batch_3 refers to (posix|os)\.system"):
            load_dataset("cifar10", path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "defect, words",
    [
        ("truncated", ["data_batch_2", "not a readable CIFAR batch"]),
        ("missing", ["data_batch_2", "lacks"]),
        ("shape", ["data_batch_2", "uint8 N x 3072"]),
        ("labels", ["data_batch_2", "count mismatch"]),
    ],
)
def test_cifar_defects(tmp_path, defect, words):
    batches = cifar_batches()
    if defect == "shape":
        batches["data_batch_2"][b"data"] = np.zeros((3, 100), np.uint8)
    if defect == "labels":
        batches["data_batch_2"][b"labels"] = [1, 2]
    write_batches(tmp_path, batches)
    bad = tmp_path / "data_batch_2"
    if defect == "truncated":
        truncate(bad, 500)
    if defect == "missing":
        bad.unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert all(word in str(info.value) for word in words)


def test_cifar_download(http_root, closed_url, monkeypatch, tmp_path):
    root, url, hits = http_root
    batches = cifar_batches(seed=5)
    write_batches(tmp_path / "b", batches)
    archive = write_tar(root / cifar.ARCHIVE, tmp_path / "b", cifar.BATCH_DIR)
    monkeypatch.setattr(cifar, "URLS", (closed_url, url + cifar.ARCHIVE))
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    check_cifar(load_dataset("cifar10", tmp_path / "dl"), batches)
    assert (tmp_path / "dl" / cifar.ARCHIVE).is_file() and sum(hits.values()) == 1
    with pytest.raises(DataError, match="nothing found"):
        load_dataset("cifar10", tmp_path / "empty", download=False)
    monkeypatch.setattr(cifar, "MD5", "0" * 32)
    with pytest.raises(DataError, match="MD5"):
        load_dataset("cifar10", tmp_path / "dl2")
    assert not (tmp_path / "dl2" / cifar.ARCHIVE).exists()
