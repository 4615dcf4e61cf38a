"""The `cnnray` command line.

    cnnray train --model cnn --dataset mnist --data-dir ../shared/datasets/mnist --epochs 3 --workers 2 --out runs/x
    cnnray train --config jobs/configs/mnist_cnn.yaml --lr 0.05
    cnnray models [--json]

Bad input (unknown model, bad value, unknown config key, unreadable data) exits 2 with a
one-line message; a run that fails while training exits 1.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import sys
from typing import Sequence

from cnnray.flags import add_train_flags, config_from_args


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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

        log_report(summary, page)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnray.models import model_catalog

    rows = model_catalog()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<16} {'input':<14} {'classes':>7} {'parameters':>13}  description")
    for r in rows:
        shape = "x".join(str(s) for s in r["input_shape"])
        print(f"{r['name']:<16} {shape:<14} {r['num_classes']:>7} {r['parameters']:>13,}  {r['description']}")
    return 0


PLUGINS = ("cnnray.tune.cli", "cnnray.serve.cli", "cnnray.report.cli", "cnnray.tracking.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnray", description="Train, sweep and serve classic CNNs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train a model with Ray Train (DDP)", description="Train a model with Ray Train.")
    add_train_flags(p)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the report (plots + HTML page) written into --out after training")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("models", help="list the registered models", description="List the registered models.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
    # The other parts (tune, serve, report) register their subcommands from beside their
    # code: each module's `add_parsers(sub)` adds parsers whose `func(args) -> int` runs them.
    for module in PLUGINS:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # that part is not installed in this version
            raise
        plugin.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    program = argv is None  # the `cnnray` program itself, not a call from Python (tests, notebooks)
    if program:
        # At exit CPython's last collections walk every object the imports made (torch and
        # torch._dynamo: ~1 CPU-s of a `cnnray train` on the CI machine, against ~0.25 s
        # with them frozen). Registered first, so it runs after every other exit handler
        # (Ray's shutdown, weakref finalizers); objects are still freed by reference count.
        atexit.register(gc.freeze)
        # Start-up makes ~1.5M objects (torch; torch._dynamo, which every torch.optim
        # optimizer imports), none of them garbage, and CPython's full collections kept
        # walking them while they were made: five gen-2 passes of 16-152 ms, 0.43 s of a
        # 3-epoch `cnnray train` (CI machine, gc.callbacks). So nothing is collected until
        # the imports are done; then they are frozen (later collections skip them).
        gc.disable()
    try:
        from cnnray.checkpoint import CheckpointError
        from cnnray.config import ConfigError
        from cnnray.data import DataError
        from cnnray.models import UnknownModelError
        from cnnray.store import StoreError

        args = build_parser().parse_args(argv)
        if program and args.func is cmd_train:
            importlib.import_module("torch._dynamo")  # the optimizer's import, done here uncollected
    finally:
        if program:
            gc.freeze()
            gc.enable()
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, UnknownModelError, StoreError) as e:
        print(f"cnnray: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `cnnray models | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("cnnray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from cnnray.train.driver import TrainingError

        if isinstance(e, TrainingError):
            print(f"cnnray: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
