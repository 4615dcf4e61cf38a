"""The `cnnray` command line: one module per subcommand, this module ties them together.

    cnnray train --model cnn --dataset mnist --data-dir ../shared/datasets/mnist --epochs 3 --workers 2 --out runs/x
    cnnray train --config jobs/configs/mnist_cnn.yaml --lr 0.05
    cnnray models [--json]

    cnnray/cli/train.py    `cnnray train`      (flags.py: the train flags, shared with tune)
    cnnray/cli/models.py   `cnnray models`
    cnnray/cli/tune.py     `cnnray tune`
    cnnray/cli/serve.py    `cnnray serve`
    cnnray/cli/predict.py  `cnnray predict`
    cnnray/cli/report.py   `cnnray report`
    cnnray/cli/export.py   `cnnray export`
    cnnray/cli/register.py `cnnray register` (an MLflow model registry; cnnray.tracking)

Each module has `add_parser(sub)`, which adds its subparser and sets `func(args) -> int`;
a new subcommand is a new module here and one line in SUBCOMMANDS. `build_parser()` is
the whole command line (the reference page is generated from it). Nothing outside this
package imports it.

Bad input (unknown model, bad value, unknown config key, unreadable data) exits 2 with a
one-line message; a run that fails while training exits 1.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from typing import Sequence

from cnnray.cli import export, models, predict, register, report, serve, train, tune
from cnnray.cli.flags import Parser

# In the order `cnnray --help` lists them.
SUBCOMMANDS = (train, models, tune, serve, predict, report, export, register)


def build_parser() -> argparse.ArgumentParser:
    """The whole `cnnray` command line: every subcommand, every flag."""
    parser = Parser(prog="cnnray", description="Train, sweep and serve classic CNNs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, program: bool | None = None) -> int:
    """The `cnnray` command. `program`: this process is the command itself (its signals,
    exit-time collections and exit status are cnnray's), not a call from Python (tests,
    notebooks); by default, when `argv` is None. The job wrappers pass True with their
    arguments, so `ray job stop` (SIGTERM) stops a job as it stops `cnnray`."""
    if program is None:
        program = argv is None
    from cnnray import interrupts

    if program:
        # SIGTERM like Ctrl-C: cnnray.interrupts.Interrupted (a KeyboardInterrupt), so the
        # clean-up after either runs and the program exits 128 + the signal.
        interrupts.install()
    try:
        return _main(argv, program)
    except KeyboardInterrupt as e:  # at any moment: imports, Ray start-up, work, clean-up
        print(f"cnnray: interrupted ({interrupts.signal_name(e)})", file=sys.stderr, flush=True)
        if getattr(e, "next_step", None):  # how to continue: the last line a user sees
            print(e.next_step, file=sys.stderr, flush=True)
        return interrupts.exit_status(e)  # 130 for SIGINT, 143 for SIGTERM
    finally:
        if program:  # the program is ending: a signal now must not cut its exit handlers short
            interrupts.stopping(quiet=True)  # its last line (a resume hint) stays the last


def _main(argv: Sequence[str] | None, program: bool) -> int:
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
        from cnnray.errors import USER_ERRORS

        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: a resume hint repeats it
        if program and args.func is train.cmd_train:
            importlib.import_module("torch._dynamo")  # the optimizer's import, done here uncollected
    finally:
        if program:
            gc.freeze()
            gc.enable()
    from cnnray.errors import TrainingError, no_space_path, one_line

    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"cnnray: error: {one_line(e)}", file=sys.stderr)  # long ones cut, the rest in a log
        return 2
    except BrokenPipeError:  # e.g. `cnnray models | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        # Imported only here: serve.runner imports Ray, which a local-mode run never loads.
        from cnnray.serve.runner import ServeError

        if isinstance(e, (TrainingError, ServeError)) or no_space_path(e) is not None:
            print(f"cnnray: error: {one_line(e, trace=True)}", file=sys.stderr)  # a full disk too
            return 1
        raise
