"""What the job wrappers add to a `cnnray` command line: absolute result paths.

A Ray job runs in an unpacked copy of the submitted working directory inside Ray's session
folder, removed when Ray cleans its cache or the head stops, so cnnray refuses a relative
`--out` there (cnnray.paths.check_lasting). When the command line names no `--out`, results go to
`$CNNRAY_RUNS/<config or space name>-<UTC time>-<6 random hex digits>` (default `~/cnnray-runs`) on the node
that runs the job's driver: the head, unless the job asked for resources elsewhere. On
several nodes, `$CNNRAY_STORAGE` (a shared path or an `s3://`/`gs://` URI) becomes the
default `--storage-path`, where every node writes and reads checkpoints.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Sequence

RUNS_ENV = "CNNRAY_RUNS"  # folder for run outputs; default ~/cnnray-runs
STORAGE_ENV = "CNNRAY_STORAGE"  # Ray storage path for checkpoints; default <out>/ray
DEFAULT_RUNS = "~/cnnray-runs"


def subcommand_options(command: str) -> set[str]:
    """The option strings (`--out`, ...) that `cnnray COMMAND` accepts; empty if there is
    no such subcommand in this version."""
    from cnnray.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers as one action
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return set(action.choices[command]._option_string_actions)
    return set()


def given(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in argv (`--flag V` or `--flag=V`), or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def with_run_defaults(command: str, argv: Sequence[str]) -> list[str]:
    """`argv` plus an absolute `--out` (and `--storage-path` from $CNNRAY_STORAGE) where
    `cnnray COMMAND` takes them and the user gave none."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        return argv
    options = subcommand_options(command)
    if "--out" in options and given(argv, "--out") is None:
        named_by = given(argv, "--space") or given(argv, "--config")  # a sweep by its space
        name = Path(named_by).stem if named_by else command
        # UTC time to the second plus a random suffix: jobs submitted in the same second
        # must not share (and overwrite) one run folder.
        stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        from cnnray.paths import resolve_path  # the CLI's own path rule: ~ expanded, made absolute

        out = Path(resolve_path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS, RUNS_ENV)) / f"{name}-{stamp}"
        argv += ["--out", str(out)]
        print(f"[jobs] --out {out}", file=sys.stderr, flush=True)
    storage = os.environ.get(STORAGE_ENV)
    if storage and "--storage-path" in options and given(argv, "--storage-path") is None:
        argv += ["--storage-path", storage]
        print(f"[jobs] --storage-path {storage}", file=sys.stderr, flush=True)
    return argv
