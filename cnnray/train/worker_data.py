"""From a TrainConfig to one worker's batches (glue between config and data): in memory
(ShardedBatches), or streamed by Ray Data (cnnray.data.stream, `data_loader="ray-data"`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from cnnray.config import ConfigError, TrainConfig
from cnnray.data import DataError, Dataset, ShardedBatches, load_dataset, split_train_val, take_subset
from cnnray.data.loader import eval_batch_size, test_batches
from cnnray.data.stream import StreamInfo
from cnnray.data.stream_batches import StreamBatches
from cnnray.train.device import use_channels_last
from cnnray.train.sizes import DataSizes, Plan, check_sizes, split_counts

def eval_batch(cfg: TrainConfig, input_shape: tuple[int, ...]) -> int:
    """Images per evaluation batch for images of `input_shape` (C, H, W), on the device
    `cfg` trains on (cfg.gpu): `cnnray.data.eval_batch_size`."""
    return eval_batch_size(input_shape, gpu=cfg.gpu, train_batch=cfg.batch_size_per_worker)


# The train_loop_config key beside TrainConfig's own that carries a streamed dataset's
# StreamInfo from the driver's scan to the workers (they cannot rescan: every image).
STREAM_INFO = "_stream_info"


@dataclass
class WorkerData:
    train: ShardedBatches | StreamBatches
    val: ShardedBatches | StreamBatches
    test: ShardedBatches | StreamBatches | None  # this rank's shard of the test split, if cfg.test_at_end
    num_classes: int
    input_shape: tuple[int, int, int]
    info: dict[str, Any]  # what Serve needs to preprocess inputs exactly as in training


def resolve_augment(cfg: TrainConfig, ds: Dataset | StreamInfo) -> str:
    """'auto': crop+flip for colour images (CIFAR practice); none for digits, where a
    flip changes the class and 3 epochs leave no time to profit from crops."""
    if cfg.augment != "auto":
        return cfg.augment
    return "crop_flip" if ds.input_shape[0] == 3 else "none"


# auto: the in-memory loader when the decoded dataset needs at most this share of the
# memory each worker has (it holds the decoded set, its shard and float batches).
MEMORY_SHARE = 0.25
STREAMABLE = ("imagefolder", "cifar10")  # datasets whose files may be an image folder


def resolve_loader(cfg: TrainConfig) -> str:
    """'memory' or 'ray-data' for cfg.data_loader. auto: ray-data only for an image folder
    whose decoded size (images x 3 x H x W of the first image) exceeds MEMORY_SHARE of the
    memory each worker has on this machine (`sources.memory_per_worker`); memory otherwise
    (MNIST, CIFAR-10: 47 MB and 184 MB decoded). ConfigError for ray-data on a dataset that
    is not an image folder."""
    from cnnray.data import sources

    if cfg.data_loader == "ray-data":
        if cfg.dataset not in STREAMABLE:
            raise ConfigError(f"data_loader 'ray-data' streams image folders and tarballs ({', '.join(STREAMABLE)}); "
                              f"{cfg.dataset} is read from its own files: use data_loader 'memory'")
        if cfg.augment == "crop_altflip":  # it needs each image's identity across epochs
            raise ConfigError("augment 'crop_altflip' (the alternating flip) needs data_loader 'memory'; "
                              "the streamed loader draws each flip anew: use augment 'crop_flip'")
        return "ray-data"
    if cfg.data_loader == "memory" or cfg.dataset != "imagefolder" or cfg.augment == "crop_altflip":
        return "memory"
    try:
        need = sources.decoded_bytes(sources.list_source(sources.source_uri(cfg.dataset, cfg.data_dir)))
    except DataError:  # not readable from here (a cluster's path?): the in-memory loader says why
        return "memory"
    return "memory" if need <= MEMORY_SHARE * sources.memory_per_worker(cfg.workers) else "ray-data"


def loop_config(cfg: TrainConfig, info: StreamInfo | None) -> dict[str, Any]:
    """The trainer's train_loop_config: the config, and a streamed dataset's StreamInfo."""
    return {**cfg.to_dict(), **({STREAM_INFO: info.to_dict()} if info is not None else {})}


def from_loop_config(config: dict[str, Any]) -> tuple[TrainConfig, StreamInfo | None]:
    """`loop_config`'s inverse, in the worker."""
    info = config.get(STREAM_INFO)
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != STREAM_INFO})
    return cfg, StreamInfo.from_dict(info) if info is not None else None


def data_info(ds: Dataset) -> dict[str, Any]:
    return {
        "dataset": ds.name,
        "input_shape": list(ds.input_shape),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "classes": list(ds.classes),
    }


def load_for(cfg: TrainConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, skip_unreadable=cfg.skip_unreadable)


def check_data(cfg: TrainConfig) -> Dataset | None:
    """The driver's check before Ray starts that the data is readable (DataError); the
    pre-flight then checks its sizes (cnnray.train.sizes). Memory: the dataset is loaded
    (and cached) and returned (local mode trains on it: one load per run); ray-data: None
    (the pre-flight listed it: sizes.nominal_sizes; every image is checked by the driver's
    scan, once Ray runs)."""
    if cfg.data_loader == "ray-data":
        return None
    return load_for(cfg)


def dataset_sizes(ds: Dataset) -> DataSizes:
    """The sizes `cnnray.train.sizes` checks, of a loaded dataset."""
    return DataSizes(ds.name, len(ds.train_labels), len(ds.test_labels), tuple(ds.input_shape), ds.num_classes)


def check_split_sizes(cfg: TrainConfig, ds: Dataset) -> Plan:
    """`sizes.check_sizes` of a loaded dataset (the driver's pre-flight, and every worker:
    a cluster run's data may be seen only there)."""
    return check_sizes(cfg, dataset_sizes(ds))


def prepare_worker_data(
    cfg: TrainConfig, rank: int, world: int, device: torch.device,
    ds: Dataset | None = None, info: StreamInfo | None = None, shards: Callable[[str], Any] | None = None,
) -> WorkerData:
    """This rank's train, validation and test batches. ray-data: from Ray Train's dataset
    shards (`shards(name)`: the session's dataset_shard), `info` being the driver's scan. memory: `ds` is the dataset `load_for(cfg)`
    gives, when the caller has loaded it already (local mode: the driver's pre-flight), so
    a run reads and decodes it once; else it is loaded here."""
    if cfg.data_loader == "ray-data":
        if info is None or shards is None:
            raise ValueError("a ray-data run needs the driver's StreamInfo (loop_config) and the dataset shards")
        return _stream_worker_data(cfg, rank, world, device, info, shards)
    ds = ds if ds is not None else load_for(cfg)
    check_split_sizes(cfg, ds)
    # Every rank draws the same subset and split (same seed), then keeps only its shard.
    x, y = take_subset(ds.train_images, ds.train_labels, cfg.subset, cfg.seed)
    tx, ty, vx, vy = split_train_val(x, y, cfg.val_fraction, cfg.seed)
    common = dict(
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        device=device,
        mean=ds.mean,
        std=ds.std,
        channels_last=use_channels_last(cfg.channels_last, device),
    )
    train = ShardedBatches(
        tx,
        ty,
        batch_size=cfg.batch_size_per_worker,
        shuffle=True,
        drop_last=True,
        augment=resolve_augment(cfg, ds),
        pad=cfg.crop_padding,
        **common,
    )
    # A rank may hold fewer validation (and test) batches than another, or none at all:
    # evaluation enters no collective per batch (see loop.validate).
    val = ShardedBatches(vx, vy, batch_size=eval_batch(cfg, ds.input_shape), shuffle=False, drop_last=False, **common)
    test = held_out_batches(cfg, device, rank, world, ds) if cfg.test_at_end else None
    return WorkerData(train, val, test, ds.num_classes, ds.input_shape, data_info(ds))


def _stream_worker_data(
    cfg: TrainConfig, rank: int, world: int, device: torch.device, info: StreamInfo, shards: Callable[[str], Any]
) -> WorkerData:
    """This rank's Ray Data shards (Ray Train's DataConfig split them: data_config;
    in local mode the whole datasets)."""
    n_train, n_val, n_test = split_counts(cfg, info.n_train, info.n_test)
    common = dict(device=device, mean=info.mean, std=info.std, sample_shape=info.input_shape)
    # Train: equal shards of n_train // world rows; the others: this rank's share, at most.
    train = StreamBatches(shards("train"), rows=n_train // world,
                          batch_size=cfg.batch_size_per_worker, drop_last=True, shuffle=True,
                          channels_last=use_channels_last(cfg.channels_last, device), **common)
    val = StreamBatches(shards("val"), rows=-(-n_val // world), batch_size=eval_batch(cfg, info.input_shape),
                        drop_last=False, shuffle=False, channels_last=use_channels_last(cfg.channels_last, device),
                        **common)
    test = None
    if cfg.test_at_end:
        test = StreamBatches(shards("test"), rows=-(-n_test // world),
                             batch_size=eval_batch(cfg, info.input_shape),
                             drop_last=False, shuffle=False, **common)
    return WorkerData(train, val, test, len(info.classes), info.input_shape, info.data_info())


def stream_datasets(cfg: TrainConfig) -> tuple[StreamInfo, dict[str, Any]]:
    """The driver's side of a ray-data run (Ray running): the scan, and the Ray Datasets
    for the trainer's datasets= (test only when the workers test at the end)."""
    from cnnray.data.stream import scan

    info = scan(cfg.dataset, cfg.data_dir, skip_unreadable=cfg.skip_unreadable)
    splits = ("train", "val", "test") if cfg.test_at_end else ("train", "val")
    return info, _build_datasets(cfg, info, resolve_augment(cfg, info), splits)


def _build_datasets(cfg: TrainConfig, info: StreamInfo, augment: str, splits: tuple[str, ...]) -> dict[str, Any]:
    """`stream.build_datasets` for `cfg`'s split and the CPUs its workers hold (none in local
    mode: the loop runs in the driver)."""
    from cnnray.data.stream import build_datasets

    reserved = 0.0 if cfg.local_mode else float(cfg.workers * (cfg.cpus_per_worker or 1))
    return build_datasets(info, cfg.data_dir, augment=augment, pad=cfg.crop_padding, subset=cfg.subset,
                          seed=cfg.seed, val_fraction=cfg.val_fraction, reserved=reserved, splits=splits)


def data_config():  # noqa: ANN201 (ray.train.DataConfig)
    """How Ray Train splits the datasets over its workers: "train" in equal shards (DDP
    ranks must take the same number of steps), the others unevenly but each row exactly
    once (evaluation counts every sample once, as the in-memory loader does), each with
    OBJECT_STORE_LIMIT of Ray Data's object store."""
    import copy

    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    from cnnray.data.stream import OBJECT_STORE_LIMIT

    class Split(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # noqa: ANN001, ANN201
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = copy.deepcopy(self._resolve_execution_options(name))
                for i, shard in enumerate(ds.streaming_split(world_size, equal=name == "train",
                                                             locality_hints=worker_node_ids)):
                    output[i][name] = shard
            return output

    limits = ExecutionResources(object_store_memory=OBJECT_STORE_LIMIT)
    return Split(execution_options=ExecutionOptions(resource_limits=limits))


def held_out_batches(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, ds: Dataset | None = None
) -> ShardedBatches | StreamBatches:
    """The held-out test split (or its subset), only for the final evaluation and report;
    with `world` > 1 this rank's shard of it. NCHW, as Serve and the report feed it.
    ray-data: the whole test split streamed by Ray Data (needs a running Ray; one rank)."""
    if cfg.data_loader == "ray-data" and ds is None and world == 1:
        from cnnray.data.stream import scan

        info = scan(cfg.dataset, cfg.data_dir, skip_unreadable=cfg.skip_unreadable)
        test = _build_datasets(cfg, info, "none", ("test",))["test"]
        return StreamBatches(test, rows=split_counts(cfg, info.n_train, info.n_test)[2],
                             batch_size=eval_batch(cfg, info.input_shape),
                             drop_last=False, shuffle=False, device=device, mean=info.mean, std=info.std,
                             sample_shape=info.input_shape)
    ds = ds or load_for(cfg)
    return test_batches(ds, subset=cfg.subset, seed=cfg.seed, batch_size=eval_batch(cfg, ds.input_shape),
                        device=device, rank=rank, world=world)
