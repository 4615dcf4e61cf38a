"""Tests of cnnray.data: image-folder datasets: trees and tarballs, gray and mixed
images, unreadable files named, the decoded cache (CPU only).

Every file is written here, in tmp_path, in the canonical formats (tests/helpers/data_files.py);
downloads go to a local http.server (tests/data/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.data import DataError, load_dataset
from cnnray.data import cifar, imagefolder

from tests.helpers.data_files import write_tar


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


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
