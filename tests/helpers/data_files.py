"""Data files as the canonical sources ship them, written by the data tests
(tests/data/test_data_*.py): IDX files (MNIST's layout), truncated files, tarballs."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np

from cnnray.data import idx

STEMS = [stem for stem, _, _ in idx.FILES]  # the four IDX files' names without .gz


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


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def write_tar(archive: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive

