"""The one typed configuration of a training run.

A `TrainConfig` is built from CLI flags and/or a YAML file, travels to every Ray Train
worker as `train_loop_config` (a plain dict, see `to_dict`) and is rebuilt there with
`TrainConfig.from_dict`. Unknown keys and out-of-range values raise `ConfigError`, so a
typo never silently becomes a default; `validate()` adds the checks against the model and
dataset registries (they import torch, this module does not). Path fields (PATH_FIELDS) are made absolute at
construction by `cnnray.paths.resolve_path`, so the value a worker rebuilds is the one
the driver checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from cnnray.argtypes import Range, coerce
from cnnray.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant", "triangle")
AUGMENTS = ("auto", "none", "crop", "crop_flip", "crop_altflip")
LR_SCALINGS = ("none", "linear")
# none: cnnray's own files only; mlflow: also one MLflow run (cnnray.tracking).
TRACKERS = ("none", "mlflow")
# memory: decode the whole dataset into every worker; ray-data: stream image folders with
# Ray Data (cnnray.data.stream); auto: memory unless an image folder's decoded size is over
# a quarter of each worker's share of this machine's memory (worker_data.resolve_loader).
DATA_LOADERS = ("auto", "memory", "ray-data")
# The batch size `lr` refers to when lr_scaling="linear" (Goyal et al., 2017).
LR_REFERENCE_BATCH = 128
# Optimizer steps in a whole run under which it rarely learns more than chance: training
# warns before it starts (cnnray.train.sizes) and the report says so. Measured: docs/training.md.
FEW_STEPS = 100


# Allowed values of the numeric fields (None is allowed wherever the field's type allows it);
# the CLI flags use the same ranges (cnnray/cli.py), so a flag and a YAML key agree.
FIELD_RANGES: dict[str, Range] = {
    "epochs": Range(1, 100_000),
    "batch_size": Range(1, 2**20),
    "lr": Range(0, 100, lo_open=True),
    "momentum": Range(0, 1, hi_open=True),
    "weight_decay": Range(0, 1),
    "warmup_epochs": Range(0, 100_000),
    "label_smoothing": Range(0, 1, hi_open=True),
    "val_fraction": Range(0, 0.5, lo_open=True),
    "subset": Range(10, 2**40),
    "seed": Range(0, 2**32 - 1),  # numpy and Python seeds take 32 bits; torch takes more
    "workers": Range(1, 4096),
    "min_workers": Range(1, 4096),
    "elastic_resize_s": Range(0, 86_400),
    "cpus_per_worker": Range(1, 4096),
    "max_failures": Range(-1, 1000),  # -1: unlimited
    "keep_checkpoints": Range(1, 100_000),
    "crop_padding": Range(0, 64),
    "norm_lr_scale": Range(0, 10_000, lo_open=True),
    "whiten_samples": Range(0, 2**31),
    "whiten_bias_epochs": Range(0, 100_000),
    "lookahead_every": Range(0, 100_000),
    "lookahead_decay": Range(0, 1, hi_open=True),
}


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train
    model: str = "cnn"  # a name from `cnnray models`
    dataset: str = "mnist"  # mnist | fashion_mnist | cifar10 | imagefolder
    data_dir: str | None = None  # None: $CNNRAY_DATA/<dataset>, downloaded if missing
    download: bool = True  # fetch missing files from the canonical mirrors
    skip_unreadable: bool = False  # train without image files that cannot be read (named); else stop
    data_loader: str = "auto"  # auto | memory | ray-data (see DATA_LOADERS)
    norm: str = "none"  # none | batch | group | layer, for every conv layer
    hidden_sizes: tuple[int, ...] | None = None  # mlp only; None: the model's default
    # --- optimisation (defaults: a 3-epoch MNIST recipe that reaches 99% test accuracy)
    epochs: int = 3
    batch_size: int = 128  # GLOBAL batch, split evenly across workers
    lr: float = 0.1  # peak learning rate for the global batch
    lr_scaling: str = "none"  # "linear": lr * batch_size / 128 (large-batch GPU runs)
    momentum: float = 0.9  # SGD momentum (beta1 for AdamW)
    nesterov: bool = True
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # sgd | adamw
    schedule: str = "onecycle"  # onecycle | cosine | constant | triangle, stepped per batch
    warmup_epochs: float = 0.0  # linear warm-up before cosine/constant; onecycle has its own
    label_smoothing: float = 0.1  # in [0, 1)
    # auto: crop_flip for colour data, none for digits; crop_altflip: airbench's alternating
    # flip (each image flipped at random in epoch 1, then the other way every next epoch)
    augment: str = "auto"
    crop_padding: int = 4  # pixels: random crops shift the image by up to this much each way
    # Learning-rate multiplier of the norm layers' parameters, whose weight decay becomes
    # weight_decay / norm_lr_scale (the same decay per step as the weights': the "bias
    # scaler" of airbench94, Jordan 2024). None: the usual lr and no weight decay.
    norm_lr_scale: float | None = None
    # Data-dependent init: the model's init_whitening (airbench) on this many training
    # images of rank 0 (DDP broadcasts rank 0's weights); 0: off.
    whiten_samples: int = 0
    # Train the whitening stem's bias only in the first N epochs (airbench94: 3); None: always.
    whiten_bias_epochs: float | None = None
    # Lookahead of the weights (Zhang et al. 2019, as airbench94 uses it): every N steps the
    # weights move to rho * slow + (1 - rho) * fast, rho = lookahead_decay**N * (t / T)**3
    # (t: step, T: total steps). Also at each epoch's end, so the weights that are
    # validated, tested and checkpointed are the averaged ones. 0: off.
    lookahead_every: int = 0
    lookahead_decay: float = 0.95  # per step
    # Test-time augmentation of validation, the final test, the report and Serve (stored in
    # the checkpoint): none | flip (mirror-averaged logits) | flip_translate (the paper's).
    tta: str = "none"
    val_fraction: float = 0.1  # of the training set, held out for model selection
    subset: int | None = None  # use only N training and N test examples (smoke runs)
    seed: int = 0
    # --- scaling
    workers: int = 1  # Ray Train workers, one DDP rank each (an elastic run's most)
    # Elastic run (`workers: MIN-MAX`, ScalingConfig(num_workers=(min, max))): the fewest
    # workers it trains with; None: always `workers`. The global batch and lr stay as set.
    min_workers: int | None = None
    # An elastic run looks this often (seconds) for room to grow; growing restarts the
    # workers from the last checkpoint (Ray's elastic_resize_monitor_interval_s).
    elastic_resize_s: float = 60.0
    gpu: bool = False  # one GPU per worker (NCCL); else CPU workers (gloo)
    # Also the torch thread count of a CPU worker. None: on a local Ray, all cores shared by
    # the workers (cores // workers); joining a cluster, 1.
    cpus_per_worker: int | None = None
    # Ray Train's local mode (ScalingConfig(num_workers=0)): the loop runs in the driver
    # process, with no Ray start-up, controller or worker actors, and no retries.
    # None: on for one worker on this machine (not joining a cluster, local storage).
    local_mode: bool | None = None
    amp: bool = True  # bf16 autocast where bf16 is native (GPUs, AVX512-BF16/AMX CPUs)
    channels_last: bool = True  # NHWC memory format, where it pays off (GPU, bf16 CPU)
    compile: bool = False  # torch.compile the model (GPU runs of many epochs)
    # --- run bookkeeping
    out: str = "runs/latest"  # result.json, checkpoints and Ray's run folder go here
    storage_path: str | None = None  # None: <out>/ray; a shared path or URI on clusters
    address: str | None = None  # Ray cluster address; None: $RAY_ADDRESS, else a new private local Ray
    resume: bool = False  # continue the run stored under <out> from its last checkpoint
    max_failures: int = 2  # worker failures tolerated, each resumed from the last checkpoint
    keep_checkpoints: int = 2  # best by validation accuracy (the latest is kept as well)
    verbose: bool = True  # one progress line per epoch
    # After the last epoch the workers (data loaded, processes warm) evaluate the test split
    # with the best-validation weights; off for Tune trials, whose winner is evaluated once.
    test_at_end: bool = True
    # --- experiment tracking (cnnray.tracking): params, per-epoch metrics and artifacts
    tracking: str = "none"  # none | mlflow
    # None: $MLFLOW_TRACKING_URI, else a file store in <out>/mlruns
    tracking_uri: str | None = None
    experiment: str | None = None  # MLflow experiment name; None: "cnnray"

    def __post_init__(self) -> None:
        _resolve_paths(self)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("data_loader", self.data_loader, DATA_LOADERS)
        _check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _check_choice("tracking", self.tracking, TRACKERS)
        for key, allowed in FIELD_RANGES.items():
            value = getattr(self, key)
            _check(value is None or allowed.contains(value), key, value, f"must be {allowed.describe()}")
        # Every worker takes batch_size / workers examples a step: a remainder would
        # silently shrink the global batch the learning rate was chosen for.
        if self.min_workers is None:
            _check(
                self.batch_size % self.workers == 0,
                "batch_size",
                self.batch_size,
                f"must be a multiple of workers={self.workers} (each worker takes an equal share); "
                f"try {_nearest_multiples(self.batch_size, self.workers)}",
            )
        else:
            _check(self.min_workers <= self.workers, "min_workers", self.min_workers,
                   f"must not be above workers={self.workers}")
            # An elastic run may train at any size in the range: each must split the batch.
            step = math.lcm(*range(self.min_workers, self.workers + 1))
            _check(
                self.batch_size % step == 0,
                "batch_size",
                self.batch_size,
                f"must be a multiple of every worker count in {self.min_workers}-{self.workers} "
                f"(an elastic run splits it evenly at any size); try {_nearest_multiples(self.batch_size, step)}",
            )
        _check(not (self.local_mode and self.workers > 1), "local_mode", self.local_mode,
               f"trains in one process: use one worker (not workers={self.workers}) or drop local_mode")
        _check(not (self.local_mode and self.elastic), "local_mode", self.local_mode,
               f"trains in one process: an elastic run (workers={self.min_workers}-{self.workers}) needs Ray Train workers")
        if self.hidden_sizes is not None:
            _check(
                len(self.hidden_sizes) > 0 and all(h >= 1 for h in self.hidden_sizes),
                "hidden_sizes",
                self.hidden_sizes,
                "must be a non-empty list of positive sizes",
            )
        # Model, norm, dataset and test-time augmentation are checked by `validate()`.

    def validate(self) -> "TrainConfig":
        """The checks against the registries (model, norm, dataset, test-time augmentation,
        the model's own fields), ConfigError for the first that fails. They import torch,
        so building a config leaves them to this one call, which training (run_training)
        and Tune (SweepConfig) make before anything starts. Returns the config."""
        from cnnray.data import DATASETS
        from cnnray.models import NORMS, list_models
        from cnnray.models.tta import TTA_MODES

        _check_choice("model", self.model, tuple(list_models()))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("tta", self.tta, TTA_MODES)
        _check_model_fields(self)
        return self

    # --- conversions -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain mapping (YAML, JSON, `train_loop_config`); unknown keys raise."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, not {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown config key {', '.join(hints)}; valid keys: {', '.join(known)}")
        data = _expand_worker_range(data)
        hints = typing.get_type_hints(cls)
        values = {k: coerce(k, v, hints[k]) for k, v in data.items()}
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML mapping of config keys; `overrides` (e.g. CLI flags) win over the file."""
        return cls.from_dict({**read_yaml_mapping(path), **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict that `from_dict` turns back into an equal config."""
        d = dataclasses.asdict(self)
        if d["hidden_sizes"] is not None:
            d["hidden_sizes"] = list(d["hidden_sizes"])
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    # --- derived values ----------------------------------------------------------------
    @property
    def effective_lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / LR_REFERENCE_BATCH
        return self.lr

    @property
    def batch_size_per_worker(self) -> int:
        return self.batch_size // self.workers

    @property
    def elastic(self) -> bool:
        """Whether Ray Train may run this config with fewer workers than `workers`."""
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def workers_text(self) -> str:
        """`workers` as typed: "2", or "1-2" for an elastic run."""
        return f"{self.min_workers}-{self.workers}" if self.elastic else str(self.workers)


def parse_workers(value: Any) -> tuple[int | None, int]:
    """(min_workers, workers) from a worker count (2, "2") or an elastic range "MIN-MAX"
    ("1-2"); min_workers is None for a fixed count (also for "2-2"). ConfigError, one line,
    for anything else ("2-1", "0-3", "a-b")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None, value
    text = str(value).strip() if isinstance(value, str) else None
    low, sep, high = (text or "").partition("-")
    if text is None or not low.strip().isdecimal() or (sep and not high.strip().isdecimal()):
        raise ConfigError(f"workers={value!r} must be a count N or a range MIN-MAX such as 1-2")
    lo, hi = int(low), int(high) if sep else int(low)
    allowed = FIELD_RANGES["workers"]
    for n in (lo, hi):
        _check(allowed.contains(n), "workers", value, f"must be {allowed.describe()}" + (" at each end" if sep else ""))
    _check(lo <= hi, "workers", value, f"is not a range: MIN {lo} is above MAX {hi}")
    return (lo if lo < hi else None), hi


def _expand_worker_range(data: Mapping[str, Any]) -> dict[str, Any]:
    """`workers: MIN-MAX` (YAML, a flag) becomes workers=MAX, min_workers=MIN."""
    data = dict(data)
    if isinstance(data.get("workers"), str):
        if data.get("min_workers") is not None:
            raise ConfigError("give an elastic range in workers (workers: 1-2), not also min_workers")
        data["min_workers"], data["workers"] = parse_workers(data["workers"])
    return data


# Path fields: (a URI is accepted, it is an output that must outlive a Ray job's files).
PATH_FIELDS = {"data_dir": (False, False), "out": (False, True), "storage_path": (True, True)}
# Fields that are model-specific constructor arguments, set only for models that take them.
MODEL_FIELDS = ("hidden_sizes",)


def _resolve_paths(cfg: TrainConfig) -> None:
    """Every path field as the user meant it where the command was typed (cnnray.paths):
    absolute, so every check, every Ray worker and result.json see the same value, and
    resolving again (in a worker, on resume) changes nothing."""
    from cnnray.paths import PathError, resolve_path

    for key, (uris, lasting) in PATH_FIELDS.items():
        value = getattr(cfg, key)
        if value is not None:
            try:
                object.__setattr__(cfg, key, resolve_path(value, key, uris=uris, lasting=lasting))
            except PathError as e:
                raise ConfigError(str(e)) from None


def _check_model_fields(cfg: TrainConfig) -> None:
    """A model-specific field (hidden_sizes) given for a model that does not take it would
    fail in every worker: refuse it here. Only the signature is read (no model is built)."""
    from cnnray.models import check_model_norm, get_model_spec, list_models, model_extra_args, resolve_model_args

    try:
        check_model_norm(cfg.model, cfg.norm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.whiten_samples or cfg.whiten_bias_epochs is not None:
        import torch

        with torch.device("meta"):  # shapes only: no memory, no init cost
            net = get_model_spec(cfg.model).fn(**resolve_model_args(cfg.model, norm=cfg.norm))
        if not callable(getattr(net, "init_whitening", None)):
            key = "whiten_samples" if cfg.whiten_samples else "whiten_bias_epochs"
            raise ConfigError(f"model {cfg.model!r} has no whitening stem for {key} (airbench has one)")
    takes = model_extra_args(cfg.model)
    for key in MODEL_FIELDS:
        if getattr(cfg, key) is not None and key not in takes:
            users = ", ".join(m for m in list_models() if key in model_extra_args(m))
            raise ConfigError(f"model {cfg.model!r} does not take {key} (models that do: {users})")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold one mapping; every problem becomes a ConfigError."""
    import yaml

    from cnnray.paths import PathError, resolve_path

    try:
        p = Path(resolve_path(path, "config file"))
    except PathError as e:
        raise ConfigError(str(e)) from None
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return data


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}")


def _nearest_multiples(n: int, k: int) -> str:
    below, above = n // k * k, -(-n // k) * k
    return " or ".join(str(m) for m in (below, above) if m >= k) or str(k)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")
