"""CIFAR-10 from the canonical python batches, their tarball, or an image-folder tree/tarball.

The python batches are pickles. They are read with `_BatchUnpickler`, which resolves only
the few globals a numpy array needs, so a tampered file raises DataError instead of
running code. Whatever the source, the decoded arrays are cached (cache.py).
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cnnray.data import cache, download, imagefolder
from cnnray.data.base import DataError, Dataset, dataset_from_arrays
from cnnray.data.decode import DECODER_ID

URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # of ARCHIVE, as published
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH, META)

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # alphabetical, so an image-folder tree sorts into the canonical label order
MEAN = (0.4914, 0.4822, 0.4465)  # per channel, [0, 1] pixel units
STD = (0.2470, 0.2435, 0.2616)
SHAPE = (3, 32, 32)  # each batch row is 3072 bytes: 1024 red, then green, then blue

LAYOUTS = (
    f"{BATCH_DIR}/ (or its files {', '.join(BATCH_FILES)}), {ARCHIVE}, "
    "or an image-folder tree or .tar.gz with train/<class>/*.jpg and test/<class>/*.jpg"
)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); allow only that.
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 strings")
    return text.encode("latin1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object, for every global a pickled numpy array may refer to."""
    try:  # numpy >= 2 moved numpy.core to numpy._core; old pickles still name numpy.core
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        # Pickle protocol 5 (Python 3.8+ default) rebuilds arrays with _frombuffer.
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, strings, numbers and numpy arrays, nothing else."""

    def __init__(self, data: bytes, source: str) -> None:
        # encoding="bytes": the canonical batches were pickled by Python 2, whose str
        # (keys, label names and the raw array data) must stay bytes here.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise DataError(
                f"{self.source} refers to {module}.{name}, which a CIFAR batch never does; "
                "refusing to unpickle it (the file is corrupt or not a CIFAR batch)"
            )
        return obj


def unpickle_batch(data: bytes, source: str) -> dict[str, Any]:
    """Safely unpickle one batch file into a dict with str keys."""
    try:
        obj = _BatchUnpickler(data, source).load()
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ...: all mean corrupt
        raise DataError(
            f"{source} is not a readable CIFAR batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{source} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != int(np.prod(SHAPE))
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: 'data' must be a uint8 N x 3072 array, got {got}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: 'labels' is not a list of integers") from exc
    if y.shape != (len(data),):
        raise DataError(f"{source} count mismatch: {len(data)} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise DataError(f"{source}: labels must be in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, *SHAPE), y


def _class_names(meta: dict[str, Any], source: str) -> list[str]:
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASSES):
        raise DataError(f"{source}: 'label_names' must list {len(CLASSES)} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def decode_batches(files: dict[str, bytes], source: str) -> dict[str, np.ndarray]:
    """Arrays from the raw bytes of the seven batch files (name -> contents)."""
    missing = [name for name in BATCH_FILES if name not in files]
    if missing:
        raise DataError(f"cifar10: {source} lacks {', '.join(missing)}")

    def load(name: str) -> dict[str, Any]:
        return unpickle_batch(files[name], f"{source}/{name}")

    train = [_batch_arrays(load(name), f"{source}/{name}") for name in TRAIN_BATCHES]
    test_x, test_y = _batch_arrays(load(TEST_BATCH), f"{source}/{TEST_BATCH}")
    return {
        "train_x": np.concatenate([x for x, _ in train]),
        "train_y": np.concatenate([y for _, y in train]),
        "test_x": test_x,
        "test_y": test_y,
        "classes": np.array(_class_names(load(META), f"{source}/{META}"), dtype=str),
    }


def _check_folder(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    classes = tuple(str(c) for c in arrays["classes"])
    if classes != CLASSES:
        raise DataError(
            f"cifar10: {source} has classes {list(classes)}, not CIFAR-10's; "
            "load it as 'imagefolder' instead"
        )
    if arrays["train_x"].shape[1:] != SHAPE:
        raise DataError(f"cifar10: {source} images are {arrays['train_x'].shape[1:]}, not {SHAPE}")
    return arrays


def _decode_archive(archive: Path) -> dict[str, np.ndarray]:
    # One pass over the archive picks up both layouts; whichever is there wins.
    items, batches = imagefolder.scan_tar(archive, frozenset(BATCH_FILES))
    if batches:
        return decode_batches(batches, str(archive))
    if items:
        return _check_folder(imagefolder.decode_images(items, str(archive)), str(archive))
    raise DataError(f"cifar10: {archive} holds neither {BATCH_DIR}/ nor train/<class>/ images")


def _locate(data_dir: Path) -> tuple[str, Path] | None:
    """("batches" | "archive" | "folder", path) for the first layout found, else None."""
    if data_dir.is_file():
        if imagefolder.is_archive(data_dir):
            return "archive", data_dir
        raise DataError(f"cifar10: {data_dir} is a file but not a .tar.gz/.tgz archive")
    if not data_dir.is_dir():
        return None
    for d in (data_dir / BATCH_DIR, data_dir):
        if any((d / name).is_file() for name in BATCH_FILES):
            return "batches", d
    if (data_dir / ARCHIVE).is_file():
        return "archive", data_dir / ARCHIVE
    root = imagefolder.find_root(data_dir)
    if root is not None:
        return ("archive" if root.is_file() else "folder"), root
    return None


def _download(data_dir: Path) -> Path:
    dest = data_dir / ARCHIVE
    with download.dir_lock(data_dir):
        if not dest.is_file():  # another worker may have fetched it while we waited
            try:
                download.fetch(URLS, dest, MD5)
            except download.DownloadFailed as exc:
                raise DataError(
                    f"cifar10: could not download {ARCHIVE} ({exc}); put {ARCHIVE} (or one of: "
                    f"{LAYOUTS}) in {data_dir}, or pass --data-dir pointing to it"
                ) from exc
    return dest


def load_cifar10(data_dir: Path, *, download_ok: bool, cache_dir: Path, skip_unreadable: bool = False) -> Dataset:
    """Load CIFAR-10 from any supported layout at `data_dir`, downloading it if allowed;
    `skip_unreadable`: an image folder's unreadable files (imagefolder.check_unreadable)."""
    found = _locate(data_dir)
    if found is None:
        if not download_ok:
            raise DataError(
                f"cifar10: nothing found at {data_dir} and download is disabled; put one of "
                f"{LAYOUTS} there, or pass --data-dir pointing to it"
            )
        found = ("archive", _download(data_dir))
    kind, path = found
    if kind == "batches":
        present = [path / name for name in BATCH_FILES if (path / name).is_file()]
        if len(present) < len(BATCH_FILES):
            missing = [name for name in BATCH_FILES if not (path / name).is_file()]
            raise DataError(
                f"cifar10: {path} lacks {', '.join(missing)}; expected {', '.join(BATCH_FILES)}"
            )

        def build() -> dict[str, np.ndarray]:
            return decode_batches({p.name: p.read_bytes() for p in present}, str(path))

        arrays = cache.cached_arrays(cache_dir, "cifar10", present, build)
    elif kind == "archive":
        # The archive may hold JPEG/PNG folders: key on the image decoder too.
        arrays = cache.cached_arrays(
            cache_dir, "cifar10", [path], lambda: _decode_archive(path), decoder=DECODER_ID
        )
    else:
        arrays = _check_folder(imagefolder.load_arrays(path, cache_dir, "cifar10"), str(path))
    imagefolder.check_arrays_unreadable(arrays, str(path), skip_unreadable)  # python batches: none
    classes = [str(c) for c in arrays["classes"]]
    return dataset_from_arrays("cifar10", arrays, classes, MEAN, STD)
