"""What one trial takes from the cluster, and how many trials fit at once (no Ray here).

Ray counts fractional resources in fixed point, 1/10,000 of a unit (ray's
`ResourceRequest`: resources are rounded to 4 decimal places), so the arithmetic here
does the same in integers: 0.1 GPU per trial fits 10 times on one GPU, where the float
division 1 // 0.1 would say 9.
"""

from __future__ import annotations

import math
from typing import Mapping

from cnnray.config import ConfigError

RESOURCE_UNIT = 10_000  # Ray's fixed-point resolution: 1e-4 of a CPU or GPU


def units(amount: float) -> int:
    """`amount` (CPUs or GPUs) in Ray's fixed-point units."""
    return int(round(amount * RESOURCE_UNIT))


def gpus_per_worker(gpus_per_trial: float, workers: int) -> float:
    """One worker's share of a trial's GPUs: what Ray Train reserves per worker.

    ConfigError when a worker would get more than one GPU (a DDP rank drives one device),
    or a share Ray cannot represent (finer than 1e-4)."""
    share = gpus_per_trial / workers
    if not 0 < share <= 1:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} over {workers} worker(s) gives each {share:g} GPUs: "
                          "each worker (one DDP rank) uses at most one GPU")
    if abs(units(share) - share * RESOURCE_UNIT) > 1e-6 or units(share) == 0:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} over {workers} worker(s) gives each {share:g} GPUs; "
                          "Ray counts GPUs in steps of 0.0001")
    return units(share) / RESOURCE_UNIT


def trials_that_fit(cluster: Mapping[str, float], cpus_per_trial: float, gpus_per_trial: float = 0.0,
                    workers: int = 1) -> int:
    """How many trials the cluster's totals (`ray.cluster_resources()`) hold at once.

    With GPUs every worker needs its share on one GPU: `gpus_per_worker` each, so a GPU
    holds floor(1 / share) workers; fractions of different GPUs do not add up to one."""
    fit = units(cluster.get("CPU", 0)) // max(1, units(cpus_per_trial))
    if gpus_per_trial:
        share = units(gpus_per_worker(gpus_per_trial, workers))
        whole_gpus = math.floor(cluster.get("GPU", 0) + 1e-9)
        workers_on_gpus = whole_gpus * (RESOURCE_UNIT // share)
        fit = min(fit, workers_on_gpus // workers)
    return int(fit)
