"""How a sweep proposes its trials: random draws, a full grid, or Optuna's TPE.

    random   every `grid` entry is enumerated, everything else drawn at random (seeded)
    grid     every `choice` and `grid` entry enumerated: all combinations; no ranges
    optuna   Optuna's TPE (Bergstra et al. 2011) through Ray Tune's OptunaSearch, behind a
             ConcurrencyLimiter so that it sees results before it proposes more; loguniform,
             uniform and choice map onto Optuna's FloatDistribution(log=True),
             FloatDistribution and CategoricalDistribution (OptunaSearch.convert_search_space)

The seed is the trials' `--seed`: BasicVariantGenerator(random_state=seed) for random and
grid, TPESampler(seed=seed) for optuna, so the same command proposes the same configs
(Optuna's first `n_startup_trials` proposals are its seeded random draws; later ones
depend on the results, which a seed alone does not fix).
"""

from __future__ import annotations

from typing import Any, Mapping

from cnnray.config import ConfigError
from cnnray.tune.space import Dist

SEARCHERS = ("random", "grid", "optuna")
# Optuna's CategoricalDistribution holds only these (optuna.distributions.CategoricalChoiceType).
OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)


def check_search(search: str, space: Mapping[str, Dist]) -> None:
    """ConfigError (one line) for a searcher that cannot take `space`."""
    if search not in SEARCHERS:
        raise ConfigError(f"unknown search {search!r}; choose one of: {', '.join(SEARCHERS)}")
    if search == "grid":
        ranges = [k for k, d in space.items() if d.kind in ("loguniform", "uniform")]
        if ranges:
            raise ConfigError(f"--search grid enumerates values: {', '.join(ranges)} is a range; "
                              "give it as {grid: [...]} or use --search random or optuna")
    if search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("--search optuna needs Optuna: pip install 'cnnray[optuna]'")
        grids = [k for k, d in space.items() if d.kind == "grid"]
        if grids:
            raise ConfigError(f"--search optuna proposes every value itself: {', '.join(grids)} is a grid; "
                              "give it as {choice: [...]}")
        for key, d in space.items():
            if d.kind == "choice" and not all(isinstance(v, OPTUNA_CHOICE_TYPES) for v in d.values):
                raise ConfigError(f"--search optuna: {key}'s choices must be numbers, strings or booleans "
                                  f"(Optuna's categorical), not {list(d.values)!r}; use --search random")


def tune_space(search: str, space: Mapping[str, Dist]) -> dict[str, Any]:
    """Ray Tune's param_space for `search`: grid turns every choice into a grid."""
    from ray import tune

    if search == "grid":
        return {k: tune.grid_search(list(d.values)) for k, d in space.items()}
    return {k: d.to_tune() for k, d in space.items()}


def grid_size(search: str, space: Mapping[str, Dist]) -> int:
    """Configs one sample covers: the product of the enumerated entries' sizes."""
    import math

    enumerated = ("grid", "choice") if search == "grid" else ("grid",)
    return math.prod(len(d.values) for d in space.values() if d.kind in enumerated)


def optuna_searcher(seed: int, max_concurrent: int) -> Any:
    """OptunaSearch with a seeded TPE sampler, limited to `max_concurrent` open proposals.
    The metric and mode come from TuneConfig, the space from the Tuner's param_space."""
    from optuna.samplers import TPESampler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=seed)), max_concurrent=max_concurrent)


def make_searcher(search: str, seed: int, max_concurrent: int) -> Any:
    """The search algorithm for TuneConfig(search_alg=...)."""
    if search == "optuna":
        return optuna_searcher(seed, max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    # The concurrency limit goes here: Tune ignores TuneConfig.max_concurrent_trials with
    # this searcher.
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
