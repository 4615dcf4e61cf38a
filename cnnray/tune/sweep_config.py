"""The one configuration of a sweep: the config every trial starts from, the search space,
the scheduler and where the results go. Checked whole at construction (ConfigError)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from cnnray.config import ConfigError, TrainConfig
from cnnray.tune.space import Dist, default_space, space_from_dict, space_to_dict

SWEEP_FILE = "sweep.json"
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class SweepConfig:
    train: TrainConfig  # every trial starts from this config (flags, --config, fixed space values)
    space: Mapping[str, Dist] = field(default_factory=default_space)  # swept TrainConfig fields
    samples: int = 8  # configs drawn from the space (a grid is repeated this many times)
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs/GPUs fit
    scheduler: str = "asha"  # asha | none (every trial runs all its epochs)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/rf of the trials at each rung
    out: str = "sweeps/latest"
    model_store: str | None = None  # None: <out>/models
    name: str | None = None  # exported model name; None: <model>-<dataset>
    resume: bool = False  # continue the sweep stored in <out> (Tuner.restore)
    register: str | None = None  # MLflow registered model that gets the winner (cnnray.tracking)

    def __post_init__(self) -> None:
        from cnnray.paths import PathError, resolve_path
        from cnnray.store import check_name
        from cnnray.tune.space import check_space

        # Paths as typed where the command ran, once (cnnray.paths); outputs that Ray would
        # delete with a job's files are refused.
        for key in ("out", "model_store"):
            if getattr(self, key) is not None:
                try:
                    object.__setattr__(self, key, resolve_path(getattr(self, key), key, lasting=True))
                except PathError as e:
                    raise ConfigError(str(e)) from None
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples} must be at least 1")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if not 1 <= self.grace_period <= self.train.epochs:
            raise ConfigError(f"grace_period={self.grace_period} must be between 1 and epochs={self.train.epochs}")
        if not self.reduction_factor > 1:
            raise ConfigError(f"reduction_factor={self.reduction_factor} must be greater than 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent={self.max_concurrent} must be at least 1")
        if not self.space:
            raise ConfigError("the search space is empty")
        self.train.validate()
        check_name(self.model_name)
        if self.register is not None:
            check_name(self.register)
        check_space(self.space, self.train)  # every trial's config and model, before any starts

    @property
    def num_trials(self) -> int:
        """Tune repeats every grid `samples` times."""
        return self.samples * math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")

    @property
    def model_name(self) -> str:
        return self.name or f"{self.train.model}-{self.train.dataset}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": self.train.to_dict(),
            "space": space_to_dict(self.space),
            "samples": self.samples,
            "max_concurrent": self.max_concurrent,
            "scheduler": self.scheduler,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
            "out": self.out,
            "model_store": self.model_store,
            "name": self.name,
            "register": self.register,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], resume: bool = False) -> "SweepConfig":
        train = TrainConfig.from_dict(data["train"])
        return cls(**{**data, "train": train, "space": space_from_dict(data["space"], train), "resume": resume})
