"""The README and the docs site: the site builds with `mkdocs build --strict`, the reference
page lists every flag of every subcommand, the README stays short, and the commands the
README and the docs mark as tested run as shown, so a command in the docs cannot rot.

A fenced block is run when the line before it is `<!-- test -->` (quick: `--help`,
`cnnray models`; run in this process through `cnnray.cli.main`) or `<!-- test slow -->`
(reads the real MNIST or a run folder; run as a user runs it, each command a fresh
`cnnray` process, the blocks of a page in order in one scratch folder standing for the
repository root).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED_DATASETS

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
BLOCK = re.compile(r"^<!-- test( slow)? -->\n```(?:bash|sh|console)?\n(.*?)^```", re.M | re.S)
README_MAX_LINES = 200


def marked_commands(page: Path, slow: bool) -> list[list[str]]:
    """The commands of `page`'s blocks marked `<!-- test -->` (or `<!-- test slow -->`), in
    order, each split as a shell would (comments dropped, `\\` continuations joined)."""
    commands = []
    for marker, body in BLOCK.findall(page.read_text()):
        if bool(marker) != slow:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                assert argv[0] == "cnnray", f"{page.name}: a tested block runs cnnray commands only: {line}"
                commands.append(argv[1:])
    return commands


def subcommands(parser: argparse.ArgumentParser, prefix: str = "cnnray"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_readme_and_quick_start_mark_commands() -> None:
    """The pages a newcomer reads first carry tested commands (a marker typo would test nothing)."""
    assert marked_commands(REPO / "README.md", slow=False)
    assert marked_commands(DOCS / "quickstart.md", slow=True)


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the details belong in docs/"


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` runs the README's test command verbatim (the one in the block after **Test**)."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"\*\*Test\*\*.*?```bash\n(.*?)\n```", readme, re.S).group(1)
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -c constraints.txt -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra: pip install -c constraints.txt -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stderr[-4000:]}"
    return out


def test_site_builds_strict(site: Path) -> None:
    for page in DOCS.glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.exists(), f"{page.name} was not built"
    for img in (DOCS / "img").glob("*.png"):
        assert img.stat().st_size < 200_000, f"{img.name} is {img.stat().st_size // 1024} KB"


def test_reference_lists_every_flag_of_every_subcommand(site: Path) -> None:
    from cnnray.cli import build_parser

    html = (site / "reference" / "index.html").read_text()
    # One section per subcommand, from its heading to the next one.
    sections = dict(re.findall(r'<h2 id="[^"]*"><code>(cnnray [^<]+)</code>(.*?)(?=<h2 |\Z)', html, re.S))
    commands = list(subcommands(build_parser()))
    assert {"cnnray train", "cnnray tune", "cnnray serve", "cnnray models"} <= {c for c, _ in commands}
    for command, parser in commands:
        assert command in sections, f"{command} has no section on the reference page"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            names = action.option_strings or [str(action.metavar or action.dest)]
            for name in names:
                assert name in sections[command], f"{command}: {name} missing from the reference page"


def test_troubleshooting_lists_every_error_message(site: Path) -> None:
    """The generated index on the troubleshooting page has a row for every message the
    code raises to a user (ConfigError ... RequestError), read from the source again here."""
    import html as html_lib
    import importlib.util

    spec = importlib.util.spec_from_file_location("error_index", DOCS / "hooks" / "error_index.py")
    index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(index)
    rows = index.messages(REPO / "cnnray")
    assert len(rows) > 100  # the walk found the raises (183 messages when this test was written)
    page = html_lib.unescape((site / "troubleshooting" / "index.html").read_text())
    for _, _, text, at in rows:
        assert at in page, f"{at}: {text} is missing from the troubleshooting page"


@pytest.mark.parametrize("page", [p for p in PAGES if marked_commands(p, slow=False)], ids=lambda p: p.name)
def test_quick_commands_run(page: Path, capsys) -> None:
    from cnnray.cli import main

    for argv in marked_commands(page, slow=False):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help exits through argparse
            rc = e.code
        out = capsys.readouterr()
        assert rc == 0, f"cnnray {shlex.join(argv)} exited {rc}: {out.err[-2000:]}"
        assert out.out.strip(), f"cnnray {shlex.join(argv)} printed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if marked_commands(p, slow=True)], ids=lambda p: p.name)
def test_slow_commands_run(page: Path, mnist_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    """The page's dataset-reading blocks, in order, in a scratch folder with `../shared`
    beside it (as the repository has), each command a fresh `cnnray` process."""
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATASETS.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for argv in marked_commands(page, slow=True):
        run = subprocess.run([sys.executable, "-m", "cnnray.cli", *argv], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"cnnray {shlex.join(argv)} exited {run.returncode}:\n{run.stderr[-3000:]}"
