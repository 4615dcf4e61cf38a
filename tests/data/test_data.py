"""Tests of cnnray.data: readers, downloads, cache, splits and ShardedBatches (CPU only).

Every file is written here, in tmp_path, in the canonical formats; downloads go to a local
http.server. Tests marked `slow` read the real files in ../shared/datasets (deselect them with
`pytest -m "not slow"`).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import http.server
import os
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.data import (
    DataError,
    ShardedBatches,
    load_dataset,
    split_train_val,
    take_subset,
)
from cnnray.data import cifar, idx, imagefolder

from tests.helpers import SHARED_DATASETS as SHARED

STEMS = [stem for stem, _, _ in idx.FILES]


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


# ---------------------------------------------------------------- IDX (MNIST) files


def idx_bytes(a: np.ndarray) -> bytes:
    """The canonical IDX layout for uint8 data: 0, 0, 0x08, ndim, big-endian dims, data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return bytes([0, 0, 0x08, a.ndim]) + dims + a.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        STEMS[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        STEMS[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        STEMS[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        STEMS[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx(directory: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


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


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


IDX_DEFECTS = {
    # name: (how to damage the plain files, words the message must contain)
    "truncated data": (lambda d: _truncate(d / STEMS[0], 2000), ["truncated", STEMS[0]]),
    "truncated header": (lambda d: _truncate(d / STEMS[2], 9), ["truncated", STEMS[2]]),
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
    _truncate(gz, len(gz.read_bytes()) // 2)
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


# ---------------------------------------------------------------- downloads


@pytest.fixture
def http_root(tmp_path):
    """A local http.server on 127.0.0.1: (dir it serves, its URL, per-path GET counts)."""
    root = tmp_path / "www"
    root.mkdir()
    hits: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            with lock:
                hits[self.path] += 1
            time.sleep(0.02)  # a slow mirror, so concurrent loaders really overlap
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", hits
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_url():
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


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


# ---------------------------------------------------------------- CIFAR-10 python batches


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


def write_tar(archive: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


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
        _truncate(bad, 500)
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


# ---------------------------------------------------------------- image folders


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_tree(root: Path, classes, n_train=2, n_test=1, shape=(6, 8, 3), seed=0) -> dict:
    """Random PNGs under root/{train,test}/<class>/NN.png; returns {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            for i in range(n):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                write_image(root / split / cls / f"{i:02d}.png", pixels)
                written[f"{split}/{cls}/{i:02d}.png"] = pixels
    return written


@pytest.mark.parametrize("as_tar", [False, True])
def test_imagefolder_tree(tmp_path, as_tar):
    written = write_tree(tmp_path / "tree", ["zebra", "ant", "cat"])
    path = tmp_path / "tree"
    if as_tar:  # with a top-level folder inside the archive, as GitHub tarballs have
        path = write_tar(tmp_path / "imgs.tgz", tmp_path / "tree", "my-images")
    ds = load_dataset("imagefolder", path)
    assert ds.classes == ("ant", "cat", "zebra") and ds.input_shape == (3, 6, 8)
    assert ds.train_images.shape == (6, 3, 6, 8) and ds.test_images.shape == (3, 3, 6, 8)
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and ds.test_labels.tolist() == [0, 1, 2]
    chw = {k: v.transpose(2, 0, 1) for k, v in written.items()}
    assert np.array_equal(ds.train_images[3].numpy(), chw["train/cat/01.png"])
    assert np.array_equal(ds.test_images[2].numpy(), chw["test/zebra/00.png"])
    x = ds.train_images.numpy() / 255.0
    assert np.allclose(ds.mean, x.mean(axis=(0, 2, 3)))
    assert np.allclose(ds.std, x.std(axis=(0, 2, 3)))


def test_imagefolder_gray_mixed_and_resized(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    for split in ("train", "test"):
        write_image(tmp_path / "g" / split / "a" / "0.png", gray)
    assert load_dataset("imagefolder", tmp_path / "g").input_shape == (1, 6, 8)

    big = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    write_image(tmp_path / "g" / "train" / "b" / "0.png", big)  # RGB and twice the size
    ds = load_dataset("imagefolder", tmp_path / "g")
    assert ds.input_shape == (3, 6, 8) and ds.num_classes == 2
    assert all(np.array_equal(ds.train_images[0, c].numpy(), gray) for c in range(3))
    resized = np.asarray(Image.fromarray(big).resize((8, 6), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.train_images[1].numpy(), resized.transpose(2, 0, 1))


@pytest.mark.parametrize("as_tar", [False, True])
def test_imagefolder_unreadable_image_named(tmp_path, as_tar):
    write_tree(tmp_path / "tree", ["a", "b"])
    (tmp_path / "tree" / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    path = write_tar(tmp_path / "t.tar.gz", tmp_path / "tree", ".") if as_tar else tmp_path / "tree"
    with pytest.raises(DataError, match=r"cannot be read as images: .*train/b/broken\.jpg \(not an image"):
        load_dataset("imagefolder", path)


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_dataset("imagefolder", tmp_path / "empty")
    write_tree(tmp_path / "t", ["a"])
    write_image(tmp_path / "t" / "test" / "z" / "0.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"test classes \['z'\]"):
        load_dataset("imagefolder", tmp_path / "t")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder")  # $CNNRAY_DATA/imagefolder was never created


def test_imagefolder_cache_reused_and_invalidated(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree", ["a", "b"])
    first = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("imagefolder-*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder, "decode_images", no_decoding)
    again = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert torch.equal(first.train_images, again.train_images) and again.classes == first.classes
    assert again.mean == first.mean
    os.utime(tmp_path / "tree" / "test" / "a" / "00.png", ns=(0, 0))  # a changed source
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    monkeypatch.undo()
    for entry in (tmp_path / "c").glob("*.npz"):
        entry.write_bytes(b"garbage")  # a corrupt entry is rebuilt, not fatal
    rebuilt = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert torch.equal(rebuilt.train_images, first.train_images)
    (tmp_path / "file").write_text("")  # an unusable cache dir only costs speed
    uncached = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "file" / "c")
    assert torch.equal(uncached.train_images, first.train_images)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_from_image_folder(tmp_path, as_tar):
    written = write_tree(tmp_path / "jpg", cifar.CLASSES, n_train=1, n_test=1, shape=(32, 32, 3))
    path = write_tar(tmp_path / "c.tar.gz", tmp_path / "jpg", ".") if as_tar else tmp_path / "jpg"
    ds = load_dataset("cifar10", path, download=False)
    assert ds.classes == cifar.CLASSES and ds.train_images.shape == (10, 3, 32, 32)
    assert ds.train_labels.tolist() == list(range(10)) and ds.mean == cifar.MEAN
    assert np.array_equal(ds.test_images[4].numpy(), written["test/deer/00.png"].transpose(2, 0, 1))
    write_tree(tmp_path / "other", ["a", "b"], shape=(32, 32, 3))
    with pytest.raises(DataError, match="imagefolder"):
        load_dataset("cifar10", tmp_path / "other", download=False)


# ---------------------------------------------------------------- splits and subsets


def indexed(n: int, c: int = 1, hw: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels all equal their index (n <= 256), labels = index."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, c, hw, hw).contiguous()
    return x, torch.arange(n)


def test_split_train_val_is_seeded_and_disjoint():
    x, y = indexed(100)
    tx, ty, vx, vy = split_train_val(x, y, 0.2, seed=1)
    assert len(vy) == 20 and len(ty) == 80
    assert sorted(ty.tolist() + vy.tolist()) == list(range(100))
    assert torch.equal(vx[:, 0, 0, 0].long(), vy)  # images follow their labels
    again = split_train_val(x, y, 0.2, seed=1)
    assert torch.equal(again[3], vy) and not torch.equal(split_train_val(x, y, 0.2, seed=2)[3], vy)
    tx, ty, vx, vy = split_train_val(x, y, 0.0, seed=1)
    assert torch.equal(ty, y) and vx.shape == (0, 1, 4, 4) and vy.shape == (0,)
    with pytest.raises(ValueError):
        split_train_val(x, y, 1.0, seed=1)


def test_take_subset():
    x, y = indexed(50)
    assert take_subset(x, y, None, seed=0)[1] is y and take_subset(x, y, 50, seed=0)[1] is y
    sx, sy = take_subset(x, y, 7, seed=3)
    assert len(sy) == 7 and len(set(sy.tolist())) == 7 and torch.equal(sx[:, 0, 0, 0].long(), sy)
    assert torch.equal(take_subset(x, y, 7, seed=3)[1], sy)
    assert not torch.equal(take_subset(x, y, 7, seed=4)[1], sy)


# ---------------------------------------------------------------- ShardedBatches


def batches(x, y, **kw):
    c = x.shape[1]
    defaults = {"batch_size": 5, "shuffle": True, "drop_last": True}
    kw = {**defaults, "mean": (0.0,) * c, "std": (1.0,) * c, **kw}
    return ShardedBatches(x, y, **kw)


def labels_of(loader) -> list[int]:
    return [v for _, yb in loader for v in yb.tolist()]


def test_train_shards_equal_and_disjoint():
    x, y = indexed(103)
    loaders = [batches(x, y, rank=r, world_size=4, seed=7) for r in range(4)]
    assert {lo.num_samples for lo in loaders} == {25} and {len(lo) for lo in loaders} == {5}
    seen = [set(labels_of(lo)) for lo in loaders]
    assert sum(len(s) for s in seen) == 100 and len(set.union(*seen)) == 100
    assert [set(labels_of(batches(x, y, rank=r, world_size=4, seed=7))) for r in range(4)] == seen


def test_eval_shards_cover_everything_once():
    x, y = indexed(103)
    kw = {"world_size": 3, "shuffle": False, "drop_last": False, "batch_size": 8}
    loaders = [batches(x, y, rank=r, **kw) for r in range(3)]
    assert [lo.num_samples for lo in loaders] == [35, 34, 34] and len(loaders[0]) == 5
    assert sorted(v for lo in loaders for v in labels_of(lo)) == list(range(103))
    lo = batches(*indexed(10), batch_size=4, shuffle=False, drop_last=False)
    sizes = [len(yb) for _, yb in lo]
    assert sizes == [4, 4, 2]


def test_normalisation_and_dtypes():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    lo = ShardedBatches(x, y, batch_size=4, shuffle=False, drop_last=False, mean=mean, std=std)
    xb, yb = next(iter(lo))
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (4, 3, 4, 4)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (x[:4].float() / 255 - m) / s
    assert torch.allclose(xb, expected, atol=1e-6) and torch.equal(yb, y[:4])


def test_crop_takes_shifted_windows_of_padded_images():
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    plain = batches(x, torch.arange(16), batch_size=16, shuffle=False, augment="none")
    crop = batches(x, torch.arange(16), batch_size=16, shuffle=False, augment="crop", pad=2)
    (ref, _), (out, _) = next(iter(plain)), next(iter(crop))
    assert out.shape == ref.shape and out.dtype == torch.float32 and not torch.equal(out, ref)
    padded = torch.nn.functional.pad(ref, (2, 2, 2, 2))
    for i in range(16):  # each output is one 8x8 window of its zero-padded image
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_flips_some_samples():
    x = torch.randint(0, 256, (64, 1, 5, 5), dtype=torch.uint8)
    ref, _ = next(iter(batches(x, torch.arange(64), batch_size=64, shuffle=False)))
    kw = {"batch_size": 64, "shuffle": False, "augment": "crop_flip", "pad": 0}
    out, _ = next(iter(batches(x, torch.arange(64), **kw)))
    same = [torch.equal(out[i], ref[i]) for i in range(64)]
    flipped = [torch.equal(out[i], ref[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped)) and 10 < sum(flipped) < 54


def test_determinism_epochs_and_ranks():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)

    def run(epoch, rank=0, seed=0):
        lo = batches(x, y, batch_size=5, augment="crop_flip", seed=seed, rank=rank, world_size=2)
        lo.set_epoch(epoch)
        return list(lo)

    a, b = run(3), run(3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other = run(4)
    def seen(run_batches):
        return sorted(torch.cat([yb for _, yb in run_batches]).tolist())

    assert seen(other) == seen(a)  # a new order of the same shard
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, other))
    assert not torch.equal(run(3, seed=1)[0][0], a[0][0])


def test_channels_last_and_validation():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    kw = {"batch_size": 4, "shuffle": False, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    cl, _ = next(iter(batches(x, torch.arange(8), channels_last=True, **kw)))
    ref, _ = next(iter(batches(x, torch.arange(8), **kw)))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)
    for bad in ({"augment": "mixup"}, {"rank": 2, "world_size": 2}, {"mean": (0.5,)}):
        with pytest.raises(ValueError):
            batches(x, torch.arange(8), **{**kw, **bad})


# ---------------------------------------------------------------- the real files (slow)


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
