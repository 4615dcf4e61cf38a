"""`cnnray export` (one module of the cnnray/cli/ package): a checkpoint as a file other
programs run, or into a model store.

    cnnray export runs/mnist --format onnx --out mnist.onnx          # run folder: its best checkpoint
    cnnray export runs/mnist/ray/x/epoch-0003 --format pt2 --out mnist.pt2
    cnnray export runs/mnist --format store --out runs/store --name mnist   # next store version

Exit 2 with one line for bad input (no such folder, a broken checkpoint, unreadable test
data); exit 1 with one line when the exporter refuses the model or an op of it, or when the
written file does not give the checkpoint's predictions (the file is then not written).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    from cnnray.argtypes import Range
    from cnnray.export.files import SAMPLE
    from cnnray.export.graph import INPUT_DTYPES

    p = sub.add_parser(
        "export",
        help="export a checkpoint as ONNX or torch.export .pt2, or into a model store",
        description="Export a run's best checkpoint (or a checkpoint folder) as an ONNX or torch.export file "
        "that takes N x C x H x W pixels 0..255 and gives the checkpoint's logits (normalisation and "
        "test-time augmentation inside), verified on its test set; or copy it into a model store.",
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a `cnnray train --out` folder or a checkpoint folder")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "store"),
                   help="onnx (ONNX Runtime, Triton, browsers), pt2 (torch.export.load), "
                        "or store (the next version of --name in the model store --out)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to write (.onnx, .pt2 plus FILE.json metadata); the store folder with --format store")
    p.add_argument("--name", help="model name in the store (--format store only)")
    p.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                   help="the graph's input type: float32 pixels 0..255, or uint8; default float32")
    p.add_argument("--sample", type=Range(1, 1 << 20).argtype(int), default=SAMPLE,
                   help=f"test images the file is verified on; default {SAMPLE}")
    p.add_argument("--data-dir", metavar="DIR",
                   help="the test set's files, when not where the run read them (the checkpoint's config)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from cnnray.config import ConfigError
    from cnnray.paths import PathError

    try:
        return _export(args)
    except PathError as e:  # a ValueError: the CLI's exit 2 takes ConfigError
        raise ConfigError(str(e)) from None


def _export(args: argparse.Namespace) -> int:
    from cnnray.config import ConfigError
    from cnnray.export.graph import ExportError

    if args.format == "store":
        if not args.name:
            raise ConfigError("--format store needs --name NAME (the model's name in the store)")
        return _to_store(args)
    if args.name:
        raise ConfigError("--name is for --format store only")
    from cnnray.export.files import export_checkpoint

    try:
        report = export_checkpoint(args.source, args.format, args.out, input_dtype=args.input_dtype,
                                   sample=args.sample, data_dir=args.data_dir)
    except ExportError as e:
        print(f"cnnray: error: {e}", file=sys.stderr)
        return 1
    print(f"[cnnray] wrote {report.describe()}", flush=True)
    return 0


def _to_store(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from cnnray.export.files import resolve_source
    from cnnray.paths import resolve_path
    from cnnray.store import export

    with ExitStack() as stack:
        ckpt = resolve_source(args.source, stack)
        target = export(ckpt, resolve_path(args.out, "--out", lasting=True), args.name)
    print(f"[cnnray] exported {ckpt} as {args.name} version {target.name} ({target})", flush=True)
    return 0
