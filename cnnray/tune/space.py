"""Search spaces over `TrainConfig` fields: the default one, YAML files, Ray Tune domains.

A space file maps TrainConfig fields to one distribution each, or to a plain value that
fixes the field for every trial:

    lr: {loguniform: [1.0e-3, 0.5]}      # float fields only, low > 0
    momentum: {uniform: [0.5, 0.99]}     # float fields only
    norm: {choice: [none, batch]}        # sampled at random
    batch_size: {grid: [64, 128]}        # every value, each `--samples` times
    weight_decay: 1.0e-4                 # fixed for every trial

Every bound and value is checked against TrainConfig before any trial starts, so an
unknown field, an unknown distribution or a value a trial would reject is a ConfigError;
`check_space` then builds every combination's config and model (see there), so a field
the model does not take (hidden_sizes for a cnn) fails here, not in every trial, and a
field no trial's config reads (nesterov under AdamW: cnnray.tune.space_effects) too.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from cnnray.config import ConfigError, TrainConfig, read_yaml_mapping

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
# Trial configs check_space builds in full (combinations of choice/grid values and range
# endpoints); each takes a few ms, so this bounds the check to about a second.
MAX_CHECKED_CONFIGS = 256
# Fields a sweep sets itself (--epochs is ASHA's horizon, --workers-per-trial the trial
# size) or that do not change what is learned: sweeping them is refused, not ignored.
NOT_SWEEPABLE = frozenset(
    {"model", "dataset", "data_dir", "download", "skip_unreadable", "epochs", "workers", "gpu", "cpus_per_worker",
     "out", "storage_path", "address", "resume", "verbose", "max_failures", "keep_checkpoints"}
)


@dataclass(frozen=True)
class Dist:
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (low, high) for the ranges; the candidates for choice/grid

    def to_tune(self) -> Any:
        """The Ray Tune domain (or grid search) for this distribution."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def to_dict(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.values)}

    def describe(self) -> str:
        if self.kind in ("loguniform", "uniform"):
            return f"{self.kind}({self.values[0]:g}, {self.values[1]:g})"
        return f"{self.kind}({', '.join(str(v) for v in self.values)})"


def default_space() -> dict[str, Dist]:
    """The lecture's three knobs: learning rate, momentum, and batchnorm or not."""
    return {
        "lr": Dist("loguniform", (1e-3, 0.5)),  # peak lr of the one-cycle schedule, global batch
        "momentum": Dist("uniform", (0.5, 0.99)),  # SGD (Nesterov) momentum
        "norm": Dist("choice", ("none", "batch")),  # no normalisation vs. batchnorm
    }


def load_space(path: str | Path, base: TrainConfig) -> tuple[dict[str, Dist], dict[str, Any]]:
    """Read a space file: (distributions by field, fixed values by field)."""
    try:
        return parse_space(read_yaml_mapping(path), base)
    except ConfigError as e:
        raise ConfigError(f"search space {path}: {e}") from None


def parse_space(data: Mapping[str, Any], base: TrainConfig) -> tuple[dict[str, Dist], dict[str, Any]]:
    """Check a space mapping against TrainConfig; `base` is the config trials start from."""
    known = [f.name for f in fields(TrainConfig)]
    hints = typing.get_type_hints(TrainConfig)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            sweepable = ", ".join(k for k in known if k not in NOT_SWEEPABLE)
            raise ConfigError(f"unknown TrainConfig field '{key}'{hint}; sweepable fields: {sweepable}")
        if key in NOT_SWEEPABLE:
            raise ConfigError(f"'{key}' cannot be swept: set it with the tune command's flags")
    fixed = {key: spec for key, spec in data.items() if not isinstance(spec, Mapping)}
    for key, value in fixed.items():
        base = _with(base, {key: value})  # the distributions are checked against the fixed values
    space = {key: _parse_dist(key, spec, hints[key], base) for key, spec in data.items() if isinstance(spec, Mapping)}
    if not space:
        raise ConfigError(f"no field is swept: give at least one of {', '.join(DISTRIBUTIONS)}")
    return space, fixed


def _parse_dist(key: str, spec: Mapping[str, Any], hint: Any, base: TrainConfig) -> Dist:
    if len(spec) != 1:
        raise ConfigError(f"{key}: give exactly one distribution ({', '.join(DISTRIBUTIONS)}), not {dict(spec)}")
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint_text = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: unknown distribution '{kind}'{hint_text}; choose one of: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{key}: {kind} needs a non-empty list, not {values!r}")
    if kind in ("loguniform", "uniform"):
        if _strip_optional(hint) is not float:
            raise ConfigError(f"{key}: {kind} needs a float field; use choice or grid for {key}")
        if len(values) != 2:
            raise ConfigError(f"{key}: {kind} needs [low, high], not {list(values)!r}")
        low, high = (_check_value(base, key, v) for v in values)
        if not low < high:
            raise ConfigError(f"{key}: {kind} needs low < high, not {list(values)!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{key}: loguniform needs low > 0, not {low!r}")
        return Dist(kind, (low, high))
    checked = tuple(_check_value(base, key, v) for v in values)
    if len(set(map(repr, checked))) != len(checked):
        raise ConfigError(f"{key}: {kind} lists a value twice: {list(values)!r}")
    return Dist(kind, checked)


def _check_value(base: TrainConfig, key: str, value: Any) -> Any:
    """The value as a trial's TrainConfig will hold it; raises what that trial would."""
    return getattr(_with(base, {key: value}), key)


def _with(base: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """`base` with `values`, as a trial would build it; a ConfigError names the fields."""
    try:
        return base.replace(**values).validate()
    except ConfigError as e:
        raise ConfigError(f"{', '.join(values)}: {e}") from None


def check_space(space: Mapping[str, Dist], base: TrainConfig) -> None:
    """Check, before any trial starts, that every trial `space` can draw could run on top of
    `base` (the final config: flags, --config and the space's fixed values).

    Every combination of the choice/grid values and the range endpoints is built as the
    trial's TrainConfig (up to MAX_CHECKED_CONFIGS; a larger space is checked one field
    at a time), and the model of each distinct (norm, hidden_sizes) on the meta device
    (shapes only: no memory). Raises ConfigError naming the swept fields that fail."""
    from cnnray.models import resolve_model_args

    built: set[str] = set()
    configs = space_configs(space, base)
    for combo, cfg in configs:
        model_kw = {"norm": cfg.norm, "hidden_sizes": list(cfg.hidden_sizes) if cfg.hidden_sizes else None}
        if repr(model_kw) in built:
            continue
        built.add(repr(model_kw))
        try:
            resolve_model_args(cfg.model, **model_kw)  # builds on the meta device
        except (ValueError, TypeError, RuntimeError) as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in combo.items() if k in model_kw) or ", ".join(combo)
            raise ConfigError(f"{shown}: model {cfg.model!r} cannot be built: {e}") from None
    from cnnray.tune.space_effects import check_effects

    check_effects(space, configs)  # a field no trial's config reads would waste the budget


def space_configs(space: Mapping[str, Dist], base: TrainConfig) -> list[tuple[dict[str, Any], TrainConfig]]:
    """(swept values, the trial's TrainConfig) of every combination of the choice/grid values
    and range endpoints (up to MAX_CHECKED_CONFIGS; a larger space one field at a time):
    the points `check_space` and the sizes pre-flight (cnnray.train.sizes) check."""
    import itertools

    keys = list(space)
    values = [space[k].values for k in keys]
    if math.prod(len(v) for v in values) <= MAX_CHECKED_CONFIGS:
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    else:
        combos = [{k: v} for k, vs in zip(keys, values) for v in vs]
    return [(combo, _with(base, combo)) for combo in combos]


def _strip_optional(hint: Any) -> Any:
    """`float | None` -> float; other annotations unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def space_to_tune(space: Mapping[str, Dist]) -> dict[str, Any]:
    """Ray Tune's `param_space`: one domain per swept field."""
    return {key: dist.to_tune() for key, dist in space.items()}


def space_to_dict(space: Mapping[str, Dist]) -> dict[str, dict[str, list[Any]]]:
    """JSON/YAML form, the same syntax as a space file (saved in sweep.json)."""
    return {key: dist.to_dict() for key, dist in space.items()}


def space_from_dict(data: Mapping[str, Any], base: TrainConfig) -> dict[str, Dist]:
    space, fixed = parse_space(data, base)
    if fixed:
        raise ConfigError(f"a saved space holds only distributions, not {sorted(fixed)}")
    return space
