"""What the job wrappers add to a `cnnray` command line: absolute result paths.

A Ray job runs in an unpacked copy of the submitted working directory inside Ray's session
folder, removed when Ray cleans its cache or the head stops, so cnnray refuses a relative
`--out` there (cnnray.paths.check_lasting). When the command line names no `--out`, results go to
`$CNNRAY_RUNS/<config or space name>-<UTC time>-<6 random hex digits>` (default `~/cnnray-runs`) on the node
that runs the job's driver: the head, unless the job asked for resources elsewhere. With
`--resume` and no `--out`, the job continues the newest unfinished run of that config
under `$CNNRAY_RUNS` (`earlier_run`), so a stopped job resubmitted with `--resume` goes on
where it stopped. On
several nodes, `$CNNRAY_STORAGE` (a shared path or an `s3://`/`gs://` URI) becomes the
default `--storage-path`, where every node writes and reads checkpoints.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
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
        from cnnray.paths import resolve_path  # the CLI's own path rule: ~ expanded, made absolute

        runs = Path(resolve_path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS, RUNS_ENV))
        out = earlier_run(runs, name, command) if resuming(argv) else None
        if out is not None:
            print(f"[jobs] --resume: continuing {out}, the newest {'unfinished ' if not finished(out, command) else ''}"
                  f"run of {name} in {runs}", file=sys.stderr, flush=True)
        else:
            # UTC time to the second plus a random suffix: jobs submitted in the same second
            # must not share (and overwrite) one run folder.
            out = runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        argv += ["--out", str(out)]
        print(f"[jobs] --out {out}", file=sys.stderr, flush=True)
    storage = os.environ.get(STORAGE_ENV)
    if storage and "--storage-path" in options and given(argv, "--storage-path") is None:
        argv += ["--storage-path", storage]
        print(f"[jobs] --storage-path {storage}", file=sys.stderr, flush=True)
    return argv


def resuming(argv: Sequence[str]) -> bool:
    """Whether argv asks to resume (the last of --resume / --no-resume wins, as in argparse)."""
    flags = [a for a in argv if a in ("--resume", "--no-resume")]
    return bool(flags) and flags[-1] == "--resume"


def finished(out: Path, command: str) -> bool:
    """Whether the run (result.json) or sweep (best.json) in `out` wrote its final file."""
    from cnnray.files import BEST_FILE, RESULT_FILE

    return (out / (BEST_FILE if command == "tune" else RESULT_FILE)).exists()


def earlier_run(runs: Path, name: str, command: str) -> Path | None:
    """The run a resubmitted `--resume` job continues: among the folders `<name>-<UTC
    time>-<random>` under `runs` that hold a run or sweep (cnnray's claim file, which stays
    once anything was written), the newest unfinished one (no result.json / best.json),
    else the newest finished one (a resume with more --epochs); None when there is none.
    Newest by the UTC time in the name, then by the claim file's modification time."""
    from cnnray.files import CLAIM_FILE

    pattern = re.compile(re.escape(name) + r"-(\d{8}-\d{6})-[0-9a-f]{6}")
    held = []
    for d in runs.glob(f"{glob.escape(name)}-*"):
        m = pattern.fullmatch(d.name)
        if m and (d / CLAIM_FILE).is_file():
            held.append((m.group(1), (d / CLAIM_FILE).stat().st_mtime, d))
    held.sort(reverse=True)
    unfinished = [d for _, _, d in held if not finished(d, command)]
    return (unfinished or [d for _, _, d in held] or [None])[0]
