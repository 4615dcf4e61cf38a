"""Register a checkpoint as a new version of an MLflow registered model, and the champion alias.

    version, decision = register_checkpoint(uri, "digits", "runs/x/ray/x/epoch-0003", tags)

The version's source is the checkpoint folder logged as a run artifact (the model store's
layout: `cnnray serve --model-store models:/NAME@champion` downloads and serves it). Its
tags are the metrics that chose it (val_accuracy, test_accuracy, epoch) and what it is
(model, dataset). Alias `champion` moves to it only when it beats the current champion's
validation accuracy on the same dataset (`params.champion_decision`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from cnnray.config import ConfigError
from cnnray.tracking.client import client_for, experiment_id, first_line
from cnnray.tracking.params import CHAMPION, ChampionDecision, champion_decision
from cnnray.tracking.train import CHECKPOINT_ARTIFACT


def version_tags(**values: Any) -> dict[str, str]:
    """Registry tags of a version (what chose it, what it is) as strings; None values left out.
    Floats keep every digit (repr), so the champion rule compares the numbers as measured."""
    return {k: repr(v) if isinstance(v, float) else str(v) for k, v in values.items() if v is not None}


def log_checkpoint(client: Any, run_id: str, checkpoint_dir: str | Path, artifact_path: str = CHECKPOINT_ARTIFACT) -> None:
    """The checkpoint as the model store exports it (verified; weights and meta.json, no
    optimizer state) under `artifact_path` of run `run_id`."""
    from cnnray.store import export

    with tempfile.TemporaryDirectory(prefix="cnnray-mlflow-") as tmp:
        client.log_artifacts(run_id, str(export(checkpoint_dir, tmp, "best")), artifact_path)


def register_checkpoint(
    uri: str, name: str, checkpoint_dir: str | Path | None, tags: Mapping[str, str], *,
    run_id: str | None = None, experiment: str | None = None, run_name: str = "register",
    echo: Callable[[str], None] = print,
) -> tuple[int, ChampionDecision]:
    """A new version of registered model `name` (created if missing) from `checkpoint_dir`,
    tagged `tags`; then the champion rule. With `run_id` the checkpoint is logged to that
    run (unless `checkpoint_dir` is None: already logged there under "checkpoint"), else
    to a new run of `experiment`. Prints one line saying the version and whether it became
    champion. ConfigError (one line) when the registry refuses."""
    client = client_for(uri)
    try:
        if run_id is None:
            run = client.create_run(experiment_id(client, experiment, uri), run_name=run_name,
                                    tags={"cnnray.kind": "register"})
            run_id = run.info.run_id
            log_checkpoint(client, run_id, checkpoint_dir)
            client.set_terminated(run_id, "FINISHED")
        elif checkpoint_dir is not None:
            log_checkpoint(client, run_id, checkpoint_dir)
        try:
            client.get_registered_model(name)
        except Exception:  # RESOURCE_DOES_NOT_EXIST: the first version of a new model
            client.create_registered_model(name, description="cnnray checkpoints (cnnray serve --model-store models:/NAME@champion)")
        version = client.create_model_version(name, source=f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", run_id=run_id,
                                              tags=dict(tags))
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except Exception:  # no alias yet
            current = None
        decision = champion_decision(tags, current.tags if current else None, int(current.version) if current else None)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"MLflow registry at {uri}: cannot register {name!r}: {first_line(e)}") from None
    echo(f"[cnnray] registered {name} version {version.version} (models:/{name}/{version.version}); {decision.reason}")
    return int(version.version), decision
