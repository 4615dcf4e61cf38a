"""The one configuration of a sweep: the config every trial starts from, the search space,
the scheduler and where the results go. Checked whole at construction (ConfigError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cnnray.config import ConfigError, TrainConfig
from cnnray.tune.space import Dist, default_space, space_from_dict, space_to_dict

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    train: TrainConfig  # every trial starts from this config (flags, --config, fixed space values)
    space: Mapping[str, Dist] = field(default_factory=default_space)  # swept TrainConfig fields
    samples: int = 8  # configs drawn from the space (a grid is repeated this many times)
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs/GPUs fit
    scheduler: str = "asha"  # asha | hyperband | pbt | none (cnnray.tune.schedulers)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/rf of the trials at each rung
    out: str = "sweeps/latest"
    model_store: str | None = None  # None: <out>/models
    name: str | None = None  # exported model name; None: <model>-<dataset>
    resume: bool = False  # continue the sweep stored in <out> (Tuner.restore)
    search: str = "random"  # random | grid | optuna (cnnray.tune.search)
    perturbation_interval: int = 1  # pbt: epochs between exploit/explore steps
    budget: int | None = None  # trial-epochs the whole sweep may spend; None: no limit
    gpus_per_trial: float | None = None  # with --gpu; None: one GPU per worker; 0.25: 4 trials a GPU
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
        if not 1 <= self.grace_period <= self.train.epochs:
            raise ConfigError(f"grace_period={self.grace_period} must be between 1 and epochs={self.train.epochs}")
        if not self.reduction_factor > 1:
            raise ConfigError(f"reduction_factor={self.reduction_factor} must be greater than 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent={self.max_concurrent} must be at least 1")
        if not self.space:
            raise ConfigError("the search space is empty")
        if self.perturbation_interval < 1:
            raise ConfigError(f"perturbation_interval={self.perturbation_interval} must be at least 1")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"budget={self.budget} must be at least 1 trial-epoch")
        self.train.validate()
        if self.gpus_per_trial is not None:
            from cnnray.tune.resources import gpus_per_worker

            if not self.train.gpu:
                raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial:g} needs --gpu")
            gpus_per_worker(self.gpus_per_trial, self.train.workers)  # a share Ray can give
        from cnnray.tune.schedulers import check_scheduler
        from cnnray.tune.search import check_search

        check_search(self.search, self.space)
        check_scheduler(self)  # also refuses an unknown scheduler
        check_name(self.model_name)
        if self.register is not None:
            check_name(self.register)
        check_space(self.space, self.train)  # every trial's config and model, before any starts

    @property
    def num_trials(self) -> int:
        """Tune repeats every grid `samples` times (--search grid: every choice too)."""
        from cnnray.tune.search import grid_size

        return self.samples * grid_size(self.search, self.space)

    @property
    def worker_gpus(self) -> float:
        """GPUs each worker reserves (0 without --gpu)."""
        from cnnray.tune.resources import gpus_per_worker

        if not self.train.gpu:
            return 0.0
        return 1.0 if self.gpus_per_trial is None else gpus_per_worker(self.gpus_per_trial, self.train.workers)

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
            "search": self.search,
            "perturbation_interval": self.perturbation_interval,
            "budget": self.budget,
            "gpus_per_trial": self.gpus_per_trial,
            "register": self.register,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], resume: bool = False) -> "SweepConfig":
        train = TrainConfig.from_dict(data["train"])
        return cls(**{**data, "train": train, "space": space_from_dict(data["space"], train), "resume": resume})
