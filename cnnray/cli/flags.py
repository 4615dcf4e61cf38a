"""What the subcommands share: the parser class, and the `cnnray train` flags of every
command that builds a TrainConfig (train.py, tune.py)."""

from __future__ import annotations

import argparse
from typing import Any


class Parser(argparse.ArgumentParser):
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


class _Workers:
    """argparse type of --workers: a count N or an elastic range MIN-MAX (the config's
    rule, `parse_workers`); each end within the config's range for `workers`."""

    __name__ = "workers"  # argparse names the type in its "invalid ... value" message

    @property
    def range(self):
        from cnnray.config import FIELD_RANGES

        return FIELD_RANGES["workers"]

    def __call__(self, text: str) -> str:
        from cnnray.config import ConfigError, parse_workers

        try:
            parse_workers(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text


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
    "--data-loader": ("data_loader", dict(help="auto | memory | ray-data (stream image folders with Ray Data); "
                                          "default auto: ray-data when the decoded folder would not fit comfortably in a worker's memory")),
    "--epochs": ("epochs", dict(type=_number("epochs", int), help="training epochs; default 3")),
    "--workers": ("workers", dict(type=_Workers(), help="Ray Train workers (DDP ranks), or an elastic range MIN-MAX "
                                  "(e.g. 1-2: goes on with fewer when nodes leave); default 1")),
    "--elastic-resize-s": ("elastic_resize_s", dict(type=_number("elastic_resize_s", float),
                                                    help="an elastic run looks this often (seconds) for room to grow; default 60")),
    "--local-mode": ("local_mode", dict(action=argparse.BooleanOptionalAction,
                                        help="Ray Train's local mode: train in this process, no Ray start-up; "
                                        "default: on for one worker on this machine")),
    "--gpu": ("gpu", dict(action=argparse.BooleanOptionalAction, help="one GPU per worker (NCCL)")),
    "--cpus-per-worker": ("cpus_per_worker", dict(type=_number("cpus_per_worker", int), help="CPUs (and torch threads) per worker; default: on a local Ray all cores / workers, on a cluster 1")),
    "--batch-size": ("batch_size", dict(type=_number("batch_size", int), help="global batch size, split across workers; default 128")),
    "--lr": ("lr", dict(type=_number("lr", float), help="peak learning rate for the global batch; default 0.1")),
    "--lr-scaling": ("lr_scaling", dict(help="none | linear (lr * batch_size / 128); default none")),
    "--momentum": ("momentum", dict(type=_number("momentum", float), help="SGD momentum (AdamW beta1); default 0.9")),
    "--nesterov": ("nesterov", dict(action=argparse.BooleanOptionalAction, help="Nesterov momentum; default on")),
    "--weight-decay": ("weight_decay", dict(type=_number("weight_decay", float), help="decoupled from biases/norms; default 5e-4")),
    "--optimizer": ("optimizer", dict(help="sgd | adamw; default sgd")),
    "--schedule": ("schedule", dict(help="onecycle | cosine | constant | triangle; default onecycle")),
    "--warmup-epochs": ("warmup_epochs", dict(type=_number("warmup_epochs", float), help="linear warm-up for cosine/constant; default 0")),
    "--label-smoothing": ("label_smoothing", dict(type=_number("label_smoothing", float), help="default 0.1")),
    "--augment": ("augment", dict(help="auto | none | crop | crop_flip | crop_altflip; default auto")),
    "--norm": ("norm", dict(help="none | batch | group | layer; default none (airbench needs one)")),
    "--tta": ("tta", dict(help="test-time augmentation of validation, test, report and Serve: "
                               "none | flip | flip_translate; default none")),
    "--hidden-sizes": ("hidden_sizes", dict(type=_csv_ints, help="mlp hidden sizes, e.g. 512,256")),
    "--val-fraction": ("val_fraction", dict(type=_number("val_fraction", float), help="share of training data held out; default 0.1")),
    "--subset": ("subset", dict(type=_number("subset", int), help="use only N training and N test examples (smoke runs)")),
    "--seed": ("seed", dict(type=_number("seed", int), help="default 0")),
    "--out": ("out", dict(help="run folder for result.json and checkpoints; default runs/latest")),
    "--storage-path": ("storage_path", dict(help="Ray storage (shared path or URI on clusters); default <out>/ray")),
    "--address": ("address", dict(help="Ray cluster to join (auto: the `ray start` on this machine); default $RAY_ADDRESS, else a new private local Ray")),
    "--resume": ("resume", dict(action=argparse.BooleanOptionalAction, help="continue the run in --out")),
    "--max-failures": ("max_failures", dict(type=_number("max_failures", int), help="worker failures to recover from; default 2")),
    "--amp": ("amp", dict(action=argparse.BooleanOptionalAction, help="bf16 autocast where native (GPU, AVX512-BF16/AMX CPU); default on")),
    "--compile": ("compile", dict(action=argparse.BooleanOptionalAction, help="torch.compile on GPU; default off")),
    "--tracking": ("tracking", dict(help="none | mlflow: log params, per-epoch metrics and artifacts to MLflow; default none")),
    "--tracking-uri": ("tracking_uri", dict(help="MLflow tracking server; default $MLFLOW_TRACKING_URI, else <out>/mlruns")),
    "--experiment": ("experiment", dict(help="MLflow experiment name; default cnnray")),
    "--download": ("download", dict(action=argparse.BooleanOptionalAction, help="download missing data; default on")),
    "--skip-unreadable": ("skip_unreadable", dict(action=argparse.BooleanOptionalAction,
                          help="train without the image files that cannot be read (their count and a few "
                               "names are printed); default off: such files stop the run (exit 2)")),
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
    if getattr(args, "workers", None) is not None:
        values.pop("min_workers", None)  # --workers N or MIN-MAX replaces the file's whole range
    return TrainConfig.from_dict(values)
