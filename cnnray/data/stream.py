"""Image folders streamed with Ray Data (`--data-loader ray-data`): never all in memory.

    info = scan("imagefolder", data_dir)   # listing + one decode pass: classes, size, mean/std
    datasets = build_datasets(info, data_dir, augment="crop_flip", pad=4, subset=None, seed=0,
                              val_fraction=0.1)  # {"train", "val", "test"}: Ray Datasets of batches
    # in each Ray Train worker: StreamBatches(ray.train.get_dataset_shard("train"), ...)

Sources: an image-folder tree `<root>/{train,test}/<class>/*` or a tarball of one, on a
local path or any URI pyarrow.fs reads (file://, s3://, gs://, hdfs://...), as the
in-memory loader (imagefolder.py) reads them: the same listing rules, the same sorted
order, the same split rule (take_subset + split_train_val over that order), the same
decoder (`decode.decode_image`, at the first train image's size), the same per-channel
mean/std (exact integer pixel sums), the same normalisation and crop/flip rules
(loader.crop_flip). Decoding and augmentation run in Ray Data tasks on any node's CPUs;
the Ray Train workers receive ready batches. Checkpoints therefore carry the same
`data_info` as the in-memory path, and Serve preprocesses identically.

Differences from the in-memory loader, by design: the sample order of an epoch comes from
Ray Data (files shuffled each epoch, plus a bounded local shuffle buffer) and the crop/flip
draws from fresh entropy per batch, so a run is not bit-reproducible (accuracy is).

Cost: `scan` decodes every image once (as the in-memory loader does) to check it and to
compute the statistics; its result (no pixels) is cached in the data cache dir, keyed on
every file's path, size and mtime and the decoder's id. Every problem raises `DataError`.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cnnray.data.base import DataError, split_train_val, take_subset
from cnnray.data.decode import TRAINING_LIMITS, DecodeError, decode_image
from cnnray.data.imagefolder import pixel_sums, stats_from_sums
from cnnray.data.loader import augment_offsets, crop_flip, normalization, normalize
from cnnray.data.sources import (
    Item,
    Listing,
    cache_key,
    cache_read,
    cache_write,
    file_stat,
    filesystem,
    list_source,
    open_tar,
    source_uri,
)
from cnnray.errors import first_line

# Images per decode task call: ~3 MB of decoded CIFAR, ~19 MB of 224 x 224 RGB; small enough
# that a decode task's memory stays far below a worker's, big enough to amortise the call.
DECODE_BATCH = 64
# Ray Data's object-store budget per streamed dataset (bytes): the decoded batches in
# flight between decode tasks and trainers are capped here, so streaming stays bounded
# however large the dataset (Ray Data applies back-pressure to the reads beyond it).
OBJECT_STORE_LIMIT = 512 * 2**20
# Bytes of decoded samples in each trainer's local shuffle buffer, which mixes the blocks
# of files Ray Data delivers: 2,730 CIFAR images (float32), 170 of 128 x 128 RGB; at most
# SHUFFLE_MAX_ROWS, at least one batch.
SHUFFLE_BYTES = 32 * 2**20
SHUFFLE_MAX_ROWS = 4096


@dataclass(frozen=True)
class StreamInfo:
    """What workers, checkpoints and Serve need of a streamed dataset (JSON-safe)."""

    dataset: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units
    std: tuple[float, ...]
    n_train: int  # images in the source's train split (before --subset and validation)
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StreamInfo":
        return cls(
            dataset=str(d["dataset"]), classes=tuple(d["classes"]), input_shape=tuple(d["input_shape"]),
            mean=tuple(d["mean"]), std=tuple(d["std"]), n_train=int(d["n_train"]), n_test=int(d["n_test"]),
        )

    def data_info(self) -> dict[str, Any]:
        """The checkpoint's data metadata, key for key as `worker_data.data_info` writes it."""
        return {"dataset": self.dataset, "input_shape": list(self.input_shape), "mean": list(self.mean),
                "std": list(self.std), "classes": list(self.classes)}


# --- the one decode pass: check every image, pixel statistics ---------------------------


def first_size(listing: Listing) -> tuple[int, int]:
    """(height, width) of the first train image, as decoded: every image's training size."""
    try:
        pixels = decode_image(listing.first_train, None, None, TRAINING_LIMITS)
    except DecodeError as exc:
        raise DataError(f"cannot read image {listing.train[0].name}: {exc.message}") from None
    return int(pixels.shape[1]), int(pixels.shape[2])


def _label_of(name: str) -> str:
    return name.rsplit("/", 2)[-2]


def _decode_all(names: np.ndarray, blobs: np.ndarray, channels: int | None, size: tuple[int, int]) -> np.ndarray:
    """uint8 B x C x H x W (C = 3, gray broadcast, when channels is None) of one batch;
    DataError naming the file for an unreadable image."""
    out = np.empty((len(blobs), channels or 3, *size), dtype=np.uint8)
    for i, (name, blob) in enumerate(zip(names, blobs)):
        try:
            out[i] = decode_image(bytes(blob), channels, size, TRAINING_LIMITS)
        except DecodeError as exc:
            raise DataError(f"cannot read image {name}: {exc.message}") from None
    return out


def _scan_batch(batch: dict[str, np.ndarray], size: tuple[int, int], train: frozenset[str]) -> dict[str, Any]:
    """One row per batch: exact pixel sums of its train images (3 channels, a gray image
    on all three), whether all were gray, or the first unreadable file's message."""
    total, total_sq, n, gray = np.zeros(3, np.uint64), np.zeros(3, np.uint64), 0, True
    pixels_all = []
    for name, blob in zip(batch["path"], batch["bytes"]):
        try:
            px = decode_image(bytes(blob), None, size, TRAINING_LIMITS)
        except DecodeError as exc:
            return {"error": [f"cannot read image {name}: {exc.message}"], "n": [0], "gray": [True],
                    "sum": [total], "sumsq": [total_sq]}
        gray = gray and px.shape[0] == 1
        if name in train:
            pixels_all.append(np.broadcast_to(px, (3, *px.shape[1:])))
    if pixels_all:
        total, total_sq = pixel_sums(np.stack(pixels_all))
        n = len(pixels_all)
    return {"error": [""], "n": [n], "gray": [gray], "sum": [total], "sumsq": [total_sq]}


def quiet_console() -> None:
    """Ray Data's INFO lines (each execution's "Starting execution of Dataset ...", its
    plan) only in Ray's session log (ray-data.log), not on this process's console: a bad
    file must leave one error line, a run one progress line per epoch. Warnings and errors
    still print. Ray Data sets up its loggers when imported, so this runs after that."""
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; the others are files
            handler.setLevel(max(handler.level, logging.WARNING))


def scan(dataset: str, data_dir: str | None, cache_dir: Path | None = None) -> StreamInfo:
    """Classes, image shape and train mean/std of `dataset`'s source in `data_dir`, exactly
    as the in-memory loader computes them; every image is decoded once (Ray Data tasks) and
    the result cached. Needs a running Ray. DataError for any unreadable file."""
    quiet_console()
    listing = list_source(source_uri(dataset, data_dir), cache_dir)
    fs = listing.filesystem
    sources = [file_stat(fs, listing.path)] if listing.archive else [file_stat(fs, i.name) for i in (*listing.train, *listing.test)]
    key = cache_key("scan", listing.uri, sources)
    cached = cache_read(cache_dir, key)
    if cached is None:
        size = first_size(listing)
        train_names = frozenset(i.name for i in listing.train)
        ds = read_items(listing, [*listing.train, *listing.test], shuffle=False)
        rows = ds.map_batches(_scan_batch, fn_kwargs={"size": size, "train": train_names},
                              batch_size=DECODE_BATCH, batch_format="numpy", **_task_args()).take_all()
        errors = sorted(r["error"] for r in rows if r["error"])
        if errors:
            raise DataError(errors[0] + (f" (and {len(errors) - 1} more batches with unreadable images)" if len(errors) > 1 else ""))
        total = sum((np.asarray(r["sum"], np.uint64) for r in rows), np.zeros(3, np.uint64))
        total_sq = sum((np.asarray(r["sumsq"], np.uint64) for r in rows), np.zeros(3, np.uint64))
        gray = all(bool(r["gray"]) for r in rows)
        mean, std = stats_from_sums(total, total_sq, len(listing.train) * size[0] * size[1])
        c = 1 if gray else 3
        cached = {"size": list(size), "channels": c, "mean": [float(m) for m in mean[:c]],
                  "std": [float(s) for s in std[:c]]}
        cache_write(cache_dir, key, cached)
    classes = tuple(sorted({i.cls for i in listing.train}))
    mean, std = tuple(cached["mean"]), tuple(cached["std"])
    if dataset == "cifar10":  # CIFAR-10's own classes and published statistics
        from cnnray.data.cifar import CLASSES, MEAN, STD

        if classes != CLASSES:
            raise DataError(f"cifar10: {listing.uri} has classes {list(classes)}, not CIFAR-10's; "
                            "load it as 'imagefolder' instead")
        mean, std = MEAN, STD
    h, w = cached["size"]
    return StreamInfo(dataset, classes, (int(cached["channels"]), int(h), int(w)), mean, std,
                      len(listing.train), len(listing.test))


# --- Ray Datasets -------------------------------------------------------------------------


def _tar_members(uri: str, path: str, display: str, wanted: frozenset[str]):  # noqa: ANN202 (a Datasource)
    """A Ray Data datasource: the `wanted` image members of one tarball, as (path, bytes)
    rows, read in one sequential task (a compressed tar cannot be split) in blocks of
    DECODE_BATCH rows, so the read holds one block at a time. (Defined here, not at module
    level, so that importing this module does not import Ray.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class TarMembers(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=len(wanted), size_bytes=None, input_files=(path,), exec_stats=None)
            return [ReadTask(lambda: _read_tar_blocks(uri, path, display, wanted), meta)]

    return TarMembers()


def _read_tar_blocks(uri: str, path: str, display: str, wanted: frozenset[str]) -> Iterator[Any]:
    import pyarrow as pa

    fs = filesystem(uri)[0]
    names: list[str] = []
    blobs: list[bytes] = []
    try:
        with open_tar(fs, path) as tar:
            for member in tar:
                name = f"{display}:{member.name}"
                if name not in wanted or not member.isfile():
                    continue
                f = tar.extractfile(member)
                names.append(name)
                blobs.append(f.read() if f is not None else b"")
                if len(names) == DECODE_BATCH:
                    yield pa.table({"path": names, "bytes": pa.array(blobs, pa.binary())})
                    names, blobs = [], []
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read {display}: {first_line(exc)}") from None
    if names:
        yield pa.table({"path": names, "bytes": pa.array(blobs, pa.binary())})


def _task_args(reserved: float = 0.0) -> dict[str, Any]:
    """Resources of a read or decode task: one CPU where the cluster has CPUs beyond the
    training workers' reservation (`reserved` CPUs; Ray Data then runs as many as fit, on
    any node); else none, at most two at a time, so that they can never wait forever
    behind the training actors that hold every CPU slot of a small local Ray."""
    import ray

    free = ray.available_resources().get("CPU", 0.0) - reserved if ray.is_initialized() else 0.0
    return {"num_cpus": 1} if free >= 1 else {"num_cpus": 0, "concurrency": 2}


def read_items(listing: Listing, items: list[Item], *, shuffle: bool, reserved: float = 0.0):  # noqa: ANN201
    """A Ray Dataset of (path, bytes) rows of `items`; `shuffle`: in a new order each epoch
    (the files' order for a tree, the blocks' for a tarball); `reserved`: see _task_args."""
    import ray.data

    args = _task_args(reserved)
    if listing.archive:
        display = listing.path if "://" not in listing.uri else listing.uri
        source = _tar_members(listing.uri, listing.path, display, frozenset(i.name for i in items))
        ds = ray.data.read_datasource(source, **args)
        return ds.randomize_block_order() if shuffle else ds
    return ray.data.read_binary_files(
        [i.name for i in items], include_paths=True, filesystem=listing.filesystem,
        shuffle="files" if shuffle else None, **args,
    )


def decode_batch(batch: dict[str, np.ndarray], *, classes: list[str], shape: list[int], augment: str,
                 pad: int, mean: list[float], std: list[float]) -> dict[str, np.ndarray]:
    """A Ray Data batch of (path, bytes) -> {"image", "label"}: uint8 C x H x W images, or,
    when augmenting, normalised float32 ones cropped/flipped by the in-memory loader's rule
    (normalise, zero-pad by `pad`, crop at offsets in [0, 2 * pad], flip with p=0.5)."""
    torch.set_num_threads(1)  # one decode task per core; no intra-op threads beyond it
    index = {c: i for i, c in enumerate(classes)}
    names = batch["path"]
    x = _decode_all(names, batch["bytes"], shape[0], (shape[1], shape[2]))
    labels = np.array([index[_label_of(str(n))] for n in names], dtype=np.int64)
    if augment == "none":
        return {"image": x, "label": labels}
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    dy, dx, flips = augment_offsets(len(x), pad, g)
    t = crop_flip(normalize(torch.from_numpy(x), mean, std), dy, dx, flips if augment == "crop_flip" else None, pad)
    return {"image": t.numpy(), "label": labels}


def split_items(listing: Listing, *, subset: int | None, seed: int, val_fraction: float) -> dict[str, list[Item]]:
    """train / val / test items by the in-memory loader's rule: take_subset, then
    split_train_val (round(N * val_fraction) held out), on the sorted order; test: take_subset."""
    n = len(listing.train)
    idx = torch.arange(n)
    sx, _ = take_subset(idx, idx, subset, seed)
    tx, _, vx, _ = split_train_val(sx, sx, val_fraction, seed)
    m = len(listing.test)
    ex, _ = take_subset(torch.arange(m), torch.arange(m), subset, seed)
    return {"train": [listing.train[i] for i in tx.tolist()], "val": [listing.train[i] for i in vx.tolist()],
            "test": [listing.test[i] for i in ex.tolist()]}


def build_datasets(info: StreamInfo, data_dir: str | None, *, augment: str, pad: int, subset: int | None,
                   seed: int, val_fraction: float, reserved: float = 0.0,
                   splits: tuple[str, ...] = ("train", "val", "test"), cache_dir: Path | None = None) -> dict[str, Any]:
    """Ray Datasets of decoded batches for `splits` of the source `info` scanned ("train"
    shuffled and augmented by `augment`, crops of up to `pad` pixels; the others in order,
    uint8), split as `split_items` does, each with OBJECT_STORE_LIMIT. `reserved`: the CPUs
    the training workers will hold (the decode tasks leave them free)."""
    from ray.data import ExecutionResources

    quiet_console()
    listing = list_source(source_uri(info.dataset, data_dir), cache_dir)
    items = split_items(listing, subset=subset, seed=seed, val_fraction=val_fraction)
    out = {}
    for name in splits:
        train = name == "train"
        ds = read_items(listing, items[name], shuffle=train, reserved=reserved).map_batches(
            decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
            fn_kwargs=dict(classes=list(info.classes), shape=list(info.input_shape),
                           augment=augment if train else "none", pad=pad, mean=list(info.mean), std=list(info.std)),
            **_task_args(reserved),
        )
        ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=OBJECT_STORE_LIMIT)
        out[name] = ds
    return out


class StreamBatches:
    """A worker's batches of (normalised float32 images, int64 labels) from a Ray Data
    shard (a DataIterator, or a Dataset in local mode), with ShardedBatches' interface:
    `len()` batches per epoch (`rows` is this rank's row count), `set_epoch`. Memory: the
    shuffle buffer (SHUFFLE_BYTES) and one prefetched batch."""

    def __init__(self, shard: Any, *, rows: int, batch_size: int, drop_last: bool, shuffle: bool,
                 device: torch.device, mean: Any, std: Any, sample_shape: Any, channels_last: bool = False) -> None:
        self.shard, self.rows, self.batch_size = shard, rows, batch_size
        self.sample_shape = tuple(sample_shape)  # C, H, W
        self.drop_last, self.shuffle, self.device, self.channels_last = drop_last, shuffle, device, channels_last
        self._scale, self._shift = normalization(mean, std, device)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return self.rows

    def __len__(self) -> int:
        n, b = self.rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Kept for ShardedBatches' interface: each epoch re-executes the stream, which
        reshuffles the files and draws new augmentations by itself."""
        self.epoch = epoch

    def _shuffle_rows(self) -> int:
        per_sample = 4 * int(np.prod(self.sample_shape))  # float32 after augmentation
        return max(self.batch_size, min(SHUFFLE_MAX_ROWS, SHUFFLE_BYTES // max(per_sample, 1)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.drop_last, device=self.device,
            local_shuffle_buffer_size=self._shuffle_rows() if self.shuffle else None,
        )
        for batch in batches:
            x, y = batch["image"], batch["label"]
            if x.dtype == torch.uint8:  # not augmented: normalised here, as ShardedBatches does
                x = torch.addcmul(self._shift, x, self._scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y



