"""The layering of cnnray, held against its imports (read with `ast`, every import: at the
top of a module or inside a function). Issue 24: each layer calls only downward.

    cli/                       the `cnnray` command: one module per subcommand
    report/  tune/             read files and checkpoints / sweep Ray Train runs
    train/   serve/            training (driver, loop, sessions) / serving
    tracking/                  MLflow runs and registry, called by train/ and tune/
    config  store  checkpoint  ray_start
    data/    models/           datasets and batches / the networks
    errors  files  argtypes  paths  raytoken      the floor: imports nothing above it
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "cnnray"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The cnnray modules `path` imports. `from cnnray.x import y` names the submodule
    cnnray.x.y when y is one, else the module cnnray.x itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cnnray")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "cnnray":
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs
            if len(subs) < len(node.names):
                found.add(node.module)
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _part(module: str) -> str:
    """The layer a module belongs to: its sub-package (train, data, ...) or its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cnnray"


def _offenders(part: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if _part(m) == part
                  for d in deps if _part(d) in forbidden)


# (layer, the layers it must never import, why)
RULES = [
    ("models", {"config", "data", "train", "tune", "serve", "report", "cli", "checkpoint", "store", "ray_start"},
     "models know nothing of training or data"),
    ("data", {"config", "train", "tune", "serve", "report", "cli", "checkpoint", "store", "ray_start", "models"},
     "data has no training logic (and takes explicit arguments, not a TrainConfig)"),
    ("serve", {"train", "tune", "report", "cli"}, "serving never imports train/ or tune/"),
    ("train", {"tune", "serve", "report", "cli"}, "training never imports tune/ or the CLI"),
    ("tune", {"serve", "report", "cli"}, "tune runs Ray Train runs, nothing above"),
    ("report", {"train", "tune", "serve", "cli"}, "report reads files and checkpoints, not training code"),
    ("export", {"tune", "serve", "report", "cli"}, "export turns a checkpoint into a file; serving calls it, not the reverse"),
    ("tracking", {"serve", "tune", "report", "cli"},
     "tracking logs training runs and sweeps (tune and the driver call it); serving reads the registry itself"),
    ("explain", {"config", "data", "train", "tune", "serve", "report", "cli", "store", "ray_start"},
     "explanations need only a model: serve and the report both use them"),
]
FLOOR = {"errors": set(), "files": set(), "paths": set(), "raytoken": set(), "interrupts": set(), "argtypes": {"errors"}}


@pytest.mark.parametrize("part, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_each_layer_imports_only_downward(part, forbidden, why):
    assert _offenders(part, forbidden) == [], why


def test_nothing_imports_the_cli_but_its_own_package():
    offenders = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if _part(m) != "cli"
                       for d in deps if _part(d) == "cli")
    assert offenders == []


@pytest.mark.parametrize("module", sorted(FLOOR))
def test_the_floor_imports_nothing_above_it(module):
    assert {_part(d) for d in GRAPH[f"cnnray.{module}"]} <= FLOOR[module]


def test_no_import_circle():
    """No two modules import each other, directly or through others (Tarjan's strongly
    connected components of the import graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


# Where the line limit holds: the package, the tests, the benchmarks and the job wrappers.
LIMITED_DIRS = ("cnnray", "tests", "benchmarks", "jobs")


def test_no_source_file_over_400_lines():
    files = [p for d in LIMITED_DIRS for p in (REPO / d).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_config_imports_no_torch():
    """Reading, building and converting a config needs no torch; only `validate()` (the
    checks against the model registry) imports it."""
    code = ("import sys\n"
            "import cnnray.config\n"
            "assert 'torch' not in sys.modules\n"
            "cfg = cnnray.config.TrainConfig.from_dict({'model': 'cnn', 'epochs': 2, 'workers': '1-2', 'batch_size': 128})\n"
            "cfg.replace(lr=0.05).to_dict()\n"
            "assert 'torch' not in sys.modules, 'building a config imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ray_start_up_lives_in_one_place():
    """Only cnnray.ray_start calls ray.init (so every command's own Ray is a private one)."""
    callers = sorted(name for name, path in MODULES.items() if name != "cnnray.ray_start"
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr == "init" and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray")
    assert callers == []


def test_config_and_serve_registry_import_no_mlflow():
    """`import cnnray.config` loads no MLflow client (the tracking fields are plain
    values), nor does parsing a models:/ URI (cnnray.serve.registry): the client is
    imported only when a run is tracked or a registry is asked."""
    code = ("import sys\n"
            "import cnnray.config, cnnray.serve.registry\n"
            "cnnray.config.TrainConfig.from_dict({'model': 'cnn', 'tracking': 'mlflow', 'experiment': 'x'})\n"
            "cnnray.serve.registry.parse_registry_uri('models:/digits@champion')\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
