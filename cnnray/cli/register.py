"""`cnnray register` (one module of the cnnray/cli/ package): a training run's best checkpoint as a new version in an MLflow registry.

    cnnray register runs/x --name digits --tracking-uri http://127.0.0.1:5000

The version is tagged with the metrics that chose it (validation and test accuracy, the
epoch) and the model and dataset; alias `champion` moves to it only when its validation
accuracy beats the champion's on the same dataset. The output says which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register a run's best checkpoint in an MLflow model registry",
        description="Register the best checkpoint of a `cnnray train` run as a new version of an MLflow "
        "registered model; alias champion moves to it when it beats the champion's validation accuracy.",
    )
    p.add_argument("run", metavar="RUN", help="a `cnnray train` run folder (its --out, holding result.json)")
    p.add_argument("--name", required=True, help="registered model name (letters, digits, '.', '_', '-')")
    p.add_argument("--tracking-uri", help="MLflow tracking server (its registry); default $MLFLOW_TRACKING_URI, "
                                          "else the run's own store (<RUN>/mlflow.db)")
    p.add_argument("--experiment", help="experiment of the run that holds the checkpoint when RUN was not "
                                        "tracked on this server; default cnnray")
    p.set_defaults(func=cmd_register)


def cmd_register(args: argparse.Namespace) -> int:
    from cnnray.errors import ConfigError
    from cnnray.files import RESULT_FILE
    from cnnray.paths import PathError, resolve_path
    from cnnray.store import check_name
    from cnnray.tracking.client import check_reachable, quiet_client_settings, resolve_uri
    from cnnray.tracking.registry import register_checkpoint, version_tags
    from cnnray.tracking.train import read_run_file

    check_name(args.name)
    try:
        run = Path(resolve_path(args.run, "RUN"))
        summary = json.loads((run / RESULT_FILE).read_text())
        checkpoint = summary["checkpoint"]
    except PathError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{args.run} is not a finished `cnnray train` run (no readable result.json: {e})") from None
    uri = resolve_uri(args.tracking_uri, run)
    check_reachable(uri)  # one line, exit 2, before anything is uploaded
    quiet_client_settings()
    tracked = read_run_file(run)
    same_run = tracked.get("run_id") if tracked.get("uri") == uri else None
    tags = version_tags(
        val_accuracy=float(summary["best_val_accuracy"]), test_accuracy=summary.get("test_accuracy"),
        epoch=summary.get("best_epoch"), model=summary.get("model"), dataset=summary.get("dataset"),
        source=str(run),
    )
    register_checkpoint(uri, args.name, checkpoint, tags, run_id=same_run, experiment=args.experiment,
                        run_name=f"register {run.name}")
    return 0
