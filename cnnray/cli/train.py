"""`cnnray train`: one training run (local mode or Ray Train workers), then its report."""

from __future__ import annotations

import argparse
import shlex

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
    try:
        summary = run_training(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (cnnray.interrupts), at any moment of the run
        e.next_step = resume_hint(cfg, getattr(args, "argv", None))  # main prints it as the last line
        raise
    try:
        _report(args, summary)
    except KeyboardInterrupt as e:  # the run is complete (result.json): only its report is missing
        e.next_step = (f"[cnnray] the run finished ({summary['config']['out']}/result.json) but its report did not: "
                       f"cnnray report {shlex.quote(summary['config']['out'])}")
        raise
    return 0


def _report(args: argparse.Namespace, summary: dict) -> None:
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


def resume_hint(cfg, argv: list[str] | None) -> str:
    """The line that tells an interrupted run how to continue: the same command with
    --resume (it continues from the newest registered checkpoint, with its history; with
    none yet, it starts the run afresh), and what the run folder holds now."""
    import shlex

    from cnnray.train.run_dir import last_checkpoint_meta, run_paths

    out, storage, name = run_paths(cfg)
    try:
        meta = last_checkpoint_meta(storage, name)
    except Exception:  # noqa: BLE001 (a hint must not turn an interrupt into a traceback)
        meta = None
    held = (f"its last checkpoint is epoch {meta['epoch']} of {cfg.epochs}" if meta
            else "no epoch was checkpointed yet")
    if argv is None:
        return f"[cnnray] {out}: {held}; continue it with `cnnray train` and --resume --out {shlex.quote(str(out))}"
    command = ["cnnray", "train", *(argv[1:] if argv[:1] == ["train"] else argv)]
    if "--resume" not in command:
        command.append("--resume")
    return f"[cnnray] {out}: {held}; to continue: {shlex.join(command)}"
