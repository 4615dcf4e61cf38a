"""The one typed configuration of a training run.

A `TrainConfig` is built from CLI flags and/or a YAML file, travels to every Ray Train
worker as `train_loop_config` (a plain dict, see `to_dict`) and is rebuilt there with
`TrainConfig.from_dict`. Unknown keys and out-of-range values raise `ConfigError`, so a
typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
LR_SCALINGS = ("none", "linear")
# The batch size `lr` refers to when lr_scaling="linear" (Goyal et al., 2017).
LR_REFERENCE_BATCH = 128


class ConfigError(ValueError):
    """A configuration value or key is not acceptable; the message says which and why."""


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train
    model: str = "cnn"  # a name from `cnnray models`
    dataset: str = "mnist"  # mnist | fashion_mnist | cifar10 | imagefolder
    data_dir: str | None = None  # None: $CNNRAY_DATA/<dataset>, downloaded if missing
    download: bool = True  # fetch missing files from the canonical mirrors
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
    schedule: str = "onecycle"  # onecycle | cosine | constant, stepped per batch
    warmup_epochs: float = 0.0  # linear warm-up before cosine/constant; onecycle has its own
    label_smoothing: float = 0.1  # in [0, 1)
    augment: str = "auto"  # auto: crop_flip for colour data, none for digits
    val_fraction: float = 0.1  # of the training set, held out for model selection
    subset: int | None = None  # use only N training and N test examples (smoke runs)
    seed: int = 0
    # --- scaling
    workers: int = 1  # Ray Train workers, one DDP rank each
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
    address: str | None = None  # Ray cluster address; None: $RAY_ADDRESS or a local Ray
    resume: bool = False  # continue the run stored under <out> from its last checkpoint
    max_failures: int = 2  # worker failures tolerated, each resumed from the last checkpoint
    keep_checkpoints: int = 2  # best by validation accuracy (the latest is kept as well)
    verbose: bool = True  # one progress line per epoch
    # After the last epoch the workers (data loaded, processes warm) evaluate the test split
    # with the best-validation weights; off for Tune trials, whose winner is evaluated once.
    test_at_end: bool = True

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        _check(self.workers >= 1, "workers", self.workers, "must be at least 1")
        _check(self.cpus_per_worker is None or self.cpus_per_worker >= 1, "cpus_per_worker", self.cpus_per_worker, "must be at least 1")
        _check(
            self.batch_size >= self.workers,
            "batch_size",
            self.batch_size,
            f"must be at least the number of workers ({self.workers})",
        )
        _check(not (self.local_mode and self.workers > 1), "local_mode", self.local_mode,
               f"trains in one process: use one worker (not workers={self.workers}) or drop local_mode")
        _check(self.lr > 0, "lr", self.lr, "must be positive")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")
        _check(self.subset is None or self.subset >= 10, "subset", self.subset, "must be at least 10")
        _check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1 (-1: unlimited)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be at least 1")
        if self.hidden_sizes is not None:
            _check(
                len(self.hidden_sizes) > 0 and all(h >= 1 for h in self.hidden_sizes),
                "hidden_sizes",
                self.hidden_sizes,
                "must be a non-empty list of positive sizes",
            )
        # Model, norm and dataset names are checked against the registries, imported here
        # (not at module import) so that reading a config stays cheap.
        from cnnray.data import DATASETS
        from cnnray.models import NORMS, list_models

        _check_choice("model", self.model, tuple(list_models()))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("dataset", self.dataset, DATASETS)

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
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
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


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold one mapping; every problem becomes a ConfigError."""
    import yaml

    p = Path(path)
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


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's annotation, converting only lossless cases."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} must be a finite number, not {value!r}")
            return value
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return _coerce(key, float(value), float)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, not {value!r}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(key, v, args[0]) for v in value)
        raise ConfigError(f"{key} must be a list, not {value!r}")
    raise TypeError(f"no coercion for {key}: {hint}")  # a programming error, not user input
