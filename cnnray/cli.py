"""The `cnnray` command line.

    cnnray train --model cnn --dataset mnist --data-dir ../shared/datasets/mnist --epochs 3 --workers 2 --out runs/x
    cnnray train --config jobs/configs/mnist_cnn.yaml --lr 0.05
    cnnray models [--json]

Bad input (unknown model, bad value, unknown config key, unreadable data) exits 2 with a
one-line message; a run that fails while training exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Sequence


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _csv_ints(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return sizes


def _number(key: str, kind: type):
    """argparse type of the flag for TrainConfig field `key`: the config's own range."""
    from cnnray.config import FIELD_RANGES

    return FIELD_RANGES[key].argtype(kind)


# Flag -> (TrainConfig key, argparse kwargs). Every default is None so that only the flags a
# user typed override the YAML file and the config's own defaults.
TRAIN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="model name (see `cnnray models`); default cnn")),
    "--dataset": ("dataset", dict(help="mnist | fashion_mnist | cifar10 | imagefolder; default mnist")),
    "--data-dir": ("data_dir", dict(help="the dataset's files as their source names them; default $CNNRAY_DATA/<dataset>")),
    "--epochs": ("epochs", dict(type=_number("epochs", int), help="training epochs; default 3")),
    "--workers": ("workers", dict(type=_number("workers", int), help="Ray Train workers (DDP ranks); default 1")),
    "--gpu": ("gpu", dict(action=argparse.BooleanOptionalAction, help="one GPU per worker (NCCL)")),
    "--cpus-per-worker": ("cpus_per_worker", dict(type=_number("cpus_per_worker", int), help="CPUs (and torch threads) per worker; default 1")),
    "--batch-size": ("batch_size", dict(type=_number("batch_size", int), help="global batch size, split across workers; default 128")),
    "--lr": ("lr", dict(type=_number("lr", float), help="peak learning rate for the global batch; default 0.1")),
    "--lr-scaling": ("lr_scaling", dict(help="none | linear (lr * batch_size / 128); default none")),
    "--momentum": ("momentum", dict(type=_number("momentum", float), help="SGD momentum (AdamW beta1); default 0.9")),
    "--nesterov": ("nesterov", dict(action=argparse.BooleanOptionalAction, help="Nesterov momentum; default on")),
    "--weight-decay": ("weight_decay", dict(type=_number("weight_decay", float), help="decoupled from biases/norms; default 5e-4")),
    "--optimizer": ("optimizer", dict(help="sgd | adamw; default sgd")),
    "--schedule": ("schedule", dict(help="onecycle | cosine | constant; default onecycle")),
    "--warmup-epochs": ("warmup_epochs", dict(type=_number("warmup_epochs", float), help="linear warm-up for cosine/constant; default 0")),
    "--label-smoothing": ("label_smoothing", dict(type=_number("label_smoothing", float), help="default 0.1")),
    "--augment": ("augment", dict(help="auto | none | crop | crop_flip; default auto")),
    "--norm": ("norm", dict(help="none | batch | group | layer; default none")),
    "--hidden-sizes": ("hidden_sizes", dict(type=_csv_ints, help="mlp hidden sizes, e.g. 512,256")),
    "--val-fraction": ("val_fraction", dict(type=_number("val_fraction", float), help="share of training data held out; default 0.1")),
    "--subset": ("subset", dict(type=_number("subset", int), help="use only N training and N test examples (smoke runs)")),
    "--seed": ("seed", dict(type=_number("seed", int), help="default 0")),
    "--out": ("out", dict(help="run folder for result.json and checkpoints; default runs/latest")),
    "--storage-path": ("storage_path", dict(help="Ray storage (shared path or URI on clusters); default <out>/ray")),
    "--address": ("address", dict(help="Ray cluster to join; default $RAY_ADDRESS or a local Ray")),
    "--resume": ("resume", dict(action=argparse.BooleanOptionalAction, help="continue the run in --out")),
    "--max-failures": ("max_failures", dict(type=_number("max_failures", int), help="worker failures to recover from; default 2")),
    "--amp": ("amp", dict(action=argparse.BooleanOptionalAction, help="bf16 autocast where native (GPU, AVX512-BF16/AMX CPU); default on")),
    "--compile": ("compile", dict(action=argparse.BooleanOptionalAction, help="torch.compile on GPU; default off")),
    "--download": ("download", dict(action=argparse.BooleanOptionalAction, help="download missing data; default on")),
}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of TrainConfig keys; flags override it")
    for flag, (key, kwargs) in TRAIN_FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, **kwargs)


def config_from_args(args: argparse.Namespace):
    """YAML file (if any), then the flags that were given, into one validated TrainConfig."""
    from cnnray.config import TrainConfig, read_yaml_mapping

    values = read_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    for _, (key, _) in TRAIN_FLAGS.items():
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from cnnray.train.driver import run_training

    cfg = config_from_args(args)
    summary = run_training(cfg)
    if args.report:
        from cnnray.report import report_after_training

        report_after_training(summary["config"]["out"])
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


PLUGINS = ("cnnray.tune.cli", "cnnray.serve.cli", "cnnray.report.cli")


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
    from cnnray.checkpoint import CheckpointError
    from cnnray.config import ConfigError
    from cnnray.data import DataError
    from cnnray.models import UnknownModelError
    from cnnray.store import StoreError

    args = build_parser().parse_args(argv)
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
