"""`cnnray train`: one training run (local mode or Ray Train workers), then its report."""

from __future__ import annotations

import argparse

from cnnray.cli.flags import add_train_flags, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with Ray Train (DDP)", description="Train a model with Ray Train.")
    add_train_flags(p)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the report (plots + HTML page) written into --out after training")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from cnnray.train.driver import run_training

    cfg = config_from_args(args)
    summary = run_training(cfg)
    if args.report and summary["config"]["data_loader"] == "ray-data":
        # The report decodes its test images through the in-memory loader: not for a
        # dataset streamed because it does not fit.
        print(f"[cnnray] no report for a ray-data run (it loads the data in memory); "
              f"`cnnray report {summary['config']['out']}` makes one if the data fits", flush=True)
    elif args.report:
        from cnnray.report import report_after_training

        page = report_after_training(summary["config"]["out"])
        from cnnray.tracking.train import log_report

        log_report(summary, page)  # the report page as an artifact of the run's MLflow run, if tracked
    return 0
