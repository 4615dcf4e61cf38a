"""cnnray's data layer: datasets loaded into memory as uint8 tensors, and batch loaders.

    from cnnray.data import load_dataset, split_train_val, ShardedBatches
    ds = load_dataset("cifar10", "/data/cifar10-jpg.tar.gz")   # decoded once, then cached
    batches = ShardedBatches(ds.train_images, ds.train_labels, batch_size=512, shuffle=True,
                             drop_last=True, mean=ds.mean, std=ds.std, augment="crop_flip")

Datasets: mnist, fashion_mnist (IDX files), cifar10 (python batches or an image-folder
tree/tarball), imagefolder (train/<class>/*, test/<class>/*). Image files are read by
`cnnray.data.decode.decode_image`, the one decoder that serving uses too. Every problem
with the files raises `DataError` with a one-line message. Importing this package does
no work.
"""

from __future__ import annotations

import pickle
import struct
import tarfile
import zlib
from pathlib import Path

from cnnray.data.base import (
    DATASETS,
    DataError,
    Dataset,
    default_cache_dir,
    default_data_dir,
    split_train_val,
    take_subset,
)
from cnnray.data.cifar import load_cifar10
from cnnray.data.idx import load_idx_dataset
from cnnray.data.imagefolder import load_imagefolder
from cnnray.data.loader import AUGMENTS, ShardedBatches, eval_batch_size, normalize, test_batches

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "DataError",
    "Dataset",
    "ShardedBatches",
    "default_cache_dir",
    "default_data_dir",
    "eval_batch_size",
    "load_dataset",
    "normalize",
    "split_train_val",
    "take_subset",
    "test_batches",
]


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Load a dataset by name into memory (uint8 images, int64 labels).

    data_dir defaults to `default_data_dir(name)` ($CNNRAY_DATA/<name>, CNNRAY_DATA
    defaulting to ~/.cache/cnnray); mnist, fashion_mnist and cifar10 are downloaded there
    when missing and `download` is true. Decoded arrays are cached in `cache_dir`
    (default $CNNRAY_DATA/cache). Raises DataError for any missing or malformed input.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(key)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        if key in ("mnist", "fashion_mnist"):
            return load_idx_dataset(key, root, download_ok=download, cache_dir=cache)
        if key == "cifar10":
            return load_cifar10(root, download_ok=download, cache_dir=cache)
        return load_imagefolder(root, cache_dir=cache)
    except DataError:
        raise
    except (OSError, EOFError, struct.error, zlib.error, tarfile.TarError,
            pickle.UnpicklingError) as exc:
        # A safety net: readers report what they expect with better messages, but no raw
        # I/O or format error should reach the CLI as a traceback.
        raise DataError(f"{key}: cannot read data at {root}: {type(exc).__name__}: {exc}") from exc
