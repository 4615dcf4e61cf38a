"""Running `cnnray ARGS` in a test: in this process through `cnnray.cli.main(argv)` (the
function the program runs; no interpreter start-up, no torch/Ray import: ~2 s less per
call on the CI machine), or, where only a real process shows the behaviour (the exit
status through the entry point, no traceback on stderr, start-up and exit), as one."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """`cnnray ARGS` in this process: its exit status, stdout, and stderr's non-blank lines.

    An argparse refusal raises SystemExit(2) inside `main`; the program would exit with
    it, so it is returned as the status. Any other exception propagates (and fails the
    test), where the program would have printed a traceback."""
    from cnnray.cli import main

    capsys.readouterr()  # only this call's output
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_one_line_exit_2(result: tuple[int, str, list[str]], fragment: str) -> str:
    """`result` (from run_cli) is the refusal users see: exit 2, one line naming `fragment`."""
    code, _, lines = result
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert fragment in lines[0], lines[0]
    return lines[0]


def cnnray_process(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cnnray.cli ARGS` as its own process (no RAY_ADDRESS), output captured."""
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cnnray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
