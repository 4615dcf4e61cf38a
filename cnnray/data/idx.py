"""MNIST and Fashion-MNIST: the four IDX files, read with numpy, downloaded when missing.

IDX layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a dtype code, the number
of dimensions, then one big-endian uint32 per dimension, then the data, big-endian.
Local files are read as they are (their gzip wrappers may differ from the mirror's, so
no checksum), but every header and length is checked. Downloads are MD5-checked.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from cnnray.data import cache, download
from cnnray.data.base import DataError, Dataset, dataset_from_arrays

# (stem, what it holds, IDX magic: 0x0803 = uint8 in 3 dims, 0x0801 = uint8 in 1 dim)
FILES = (
    ("train-images-idx3-ubyte", "train_x", 0x00000803),
    ("train-labels-idx1-ubyte", "train_y", 0x00000801),
    ("t10k-images-idx3-ubyte", "test_x", 0x00000803),
    ("t10k-labels-idx1-ubyte", "test_y", 0x00000801),
)

# Mirrors in the order tried; each file is <mirror><stem>.gz. Tests monkeypatch these.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# MD5 of each mirror's .gz file (torchvision's table).
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

CLASSES = {
    "mnist": tuple("0123456789"),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}

# Per-channel (mean, std) of the training images in [0, 1] pixel units.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# IDX dtype codes; multi-byte types are big-endian on disk.
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(buf: bytes, source: str, expected_magic: int | None = None) -> np.ndarray:
    """Decode one IDX buffer; `source` names the file in error messages."""
    if len(buf) < 4:
        raise DataError(f"{source} is truncated: {len(buf)} bytes, shorter than an IDX header")
    magic = int.from_bytes(buf[:4], "big")
    code, ndim = buf[2], buf[3]
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{source}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({_describe(expected_magic)}); is it the right file?"
        )
    if buf[0] != 0 or buf[1] != 0 or code not in _DTYPES or ndim == 0:
        raise DataError(f"{source} is not an IDX file: bad magic number 0x{magic:08x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{source} is truncated inside its header ({len(buf)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got < expected:
        raise DataError(
            f"{source} is truncated: header promises {shape} ({expected} bytes of data), "
            f"file holds {got}"
        )
    if got > expected:
        raise DataError(f"{source} has {got - expected} unexpected bytes after its {shape} data")
    return np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)


def _describe(magic: int) -> str:
    dtype = _DTYPES.get((magic >> 8) & 0xFF, "unknown type")
    return f"IDX {dtype} in {magic & 0xFF} dims"


def read_idx(path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Read a plain or gzipped IDX file (by its .gz suffix)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                buf = f.read()
        else:
            buf = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_idx(buf, str(path), expected_magic)


def find_files(data_dir: Path) -> dict[str, Path | None]:
    """stem -> the file to read; the plain file wins over .gz (already inflated, faster)."""
    found: dict[str, Path | None] = {}
    for stem, _, _ in FILES:
        plain, gz = data_dir / stem, data_dir / f"{stem}.gz"
        found[stem] = plain if plain.is_file() else gz if gz.is_file() else None
    return found


def _missing_message(name: str, data_dir: Path, missing: list[str], why: str) -> str:
    names = ", ".join(f"{stem}.gz" for stem in missing)
    return (
        f"{name}: missing {names} in {data_dir} ({why}); put the files (gzipped or not) in "
        f"that directory, or pass --data-dir pointing to a directory that holds them"
    )


def _download_missing(name: str, data_dir: Path) -> None:
    with download.dir_lock(data_dir):
        # Re-check under the lock: another worker may have fetched them while we waited.
        missing = [stem for stem, path in find_files(data_dir).items() if path is None]
        for i, stem in enumerate(missing):
            try:
                download.fetch(
                    [f"{mirror}{stem}.gz" for mirror in MIRRORS[name]],
                    data_dir / f"{stem}.gz",
                    MD5[name].get(f"{stem}.gz"),
                )
            except download.DownloadFailed as exc:
                # Stop at the first failure: offline, each further file would only time out.
                why = f"download failed: {exc}"
                raise DataError(_missing_message(name, data_dir, missing[i:], why)) from exc


def _validate(name: str, arrays: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    num_classes = len(CLASSES[name])
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if len(x) != len(y):
            raise DataError(
                f"{name} {split} count mismatch: {paths[f'{split}_x']} holds {len(x)} images but "
                f"{paths[f'{split}_y'].name} holds {len(y)} labels"
            )
        if len(y) and int(y.max()) >= num_classes:
            raise DataError(
                f"{paths[f'{split}_y']} has label {int(y.max())}; "
                f"{name} labels are 0..{num_classes - 1}"
            )
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(
            f"{name}: train images are {arrays['train_x'].shape[1:]} but test images are "
            f"{arrays['test_x'].shape[1:]}"
        )


def _decode(name: str, files: dict[str, Path]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for stem, key, magic in FILES:
        path = files[stem]
        a = read_idx(path, magic)
        arrays[key], paths[key] = a, path
    _validate(name, arrays, paths)
    arrays["train_x"] = arrays["train_x"][:, None]  # N x H x W -> N x 1 x H x W
    arrays["test_x"] = arrays["test_x"][:, None]
    return arrays


def load_idx_dataset(name: str, data_dir: Path, *, download_ok: bool, cache_dir: Path) -> Dataset:
    """Load "mnist" or "fashion_mnist" from `data_dir`, downloading missing files if allowed."""
    files = find_files(data_dir)
    missing = [stem for stem, path in files.items() if path is None]
    if missing:
        if not download_ok:
            raise DataError(_missing_message(name, data_dir, missing, "download disabled"))
        _download_missing(name, data_dir)
        files = find_files(data_dir)
        missing = [stem for stem, path in files.items() if path is None]
        if missing:  # e.g. deleted by someone else right after the download
            raise DataError(_missing_message(name, data_dir, missing, "gone after download"))
    present = {stem: path for stem, path in files.items() if path is not None}
    arrays = cache.cached_arrays(
        cache_dir, name, present.values(), lambda: _decode(name, present)
    )
    mean, std = STATS[name]
    return dataset_from_arrays(name, arrays, CLASSES[name], mean, std)
