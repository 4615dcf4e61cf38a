"""Plain values for MLflow: a config as params, a report as metrics, the champion rule.

No MLflow import here, so these are cheap to call and to test.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

# MLflow refuses a param value longer than this (mlflow.utils.validation, MAX_PARAM_VAL_LENGTH).
MAX_PARAM_CHARS = 6000
# The per-epoch metrics of the training loop's report that become MLflow metrics (step = epoch).
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "best_val_accuracy",
                 "samples_per_second", "epoch_seconds", "lr")
# What the registry compares (higher is better) and what makes two versions comparable.
SCORE_TAG = "val_accuracy"
DATASET_TAG = "dataset"
CHAMPION = "champion"


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Every key of a TrainConfig dict as an MLflow param (a string): None -> "None",
    booleans and numbers as Python prints them, lists and tuples as JSON ([512, 256]).
    A value longer than MLflow's limit is cut to it (with "..." at the end)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(list(value) if isinstance(value, tuple) else value)
        else:
            text = str(value)
        out[str(key)] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


def epoch_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The EPOCH_METRICS of one epoch's report that are finite numbers (MLflow stores
    floats; a NaN would break the UI's charts)."""
    out = {}
    for key in EPOCH_METRICS:
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a new version takes alias `champion`, and the line that says why."""

    promote: bool
    reason: str


def champion_decision(new: Mapping[str, str], champion: Mapping[str, str] | None,
                      champion_version: int | None = None) -> ChampionDecision:
    """The champion rule: the new version (its tags `new`) becomes champion when there is
    none, or when its validation accuracy is strictly above the champion's (tags
    `champion`) on the same dataset. A champion on another dataset, or without a
    validation accuracy, is not comparable: it stays. A tie keeps the older champion."""
    new_score = _score(new)
    if new_score is None:
        return ChampionDecision(False, f"the new version has no {SCORE_TAG} tag: {CHAMPION} not moved")
    if champion is None:
        return ChampionDecision(True, f"no {CHAMPION} yet: the new version ({SCORE_TAG} {new_score:.4f}) becomes it")
    which = f"version {champion_version}" if champion_version is not None else "the champion"
    if champion.get(DATASET_TAG) != new.get(DATASET_TAG):
        return ChampionDecision(False, f"{CHAMPION} ({which}) is for dataset {champion.get(DATASET_TAG)!r}, not "
                                       f"{new.get(DATASET_TAG)!r}: not comparable, {CHAMPION} not moved")
    old_score = _score(champion)
    if old_score is None:
        return ChampionDecision(False, f"{CHAMPION} ({which}) has no {SCORE_TAG}: not comparable, {CHAMPION} not moved")
    if new_score > old_score:
        return ChampionDecision(True, f"{SCORE_TAG} {new_score:.4f} beats {CHAMPION} {which}'s {old_score:.4f}: "
                                      f"{CHAMPION} moved to the new version")
    return ChampionDecision(False, f"{SCORE_TAG} {new_score:.4f} does not beat {CHAMPION} {which}'s "
                                   f"{old_score:.4f}: {CHAMPION} stays")


def _score(tags: Mapping[str, str]) -> float | None:
    try:
        value = float(tags[SCORE_TAG])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
