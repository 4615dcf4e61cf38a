"""MkDocs hook: the index of every one-line error message, read from cnnray's source.

mkdocs.yml names this file under `hooks:`. troubleshooting.md explains the common messages
by hand; its marker `<!-- error-index -->` is replaced at build time by a table of every
message the code can raise to a user (ConfigError, DataError, CheckpointError, StoreError,
UnknownModelError: `cnnray: error: ...`, exit 2; RequestError: an HTTP 4xx `{"error": ...}`),
found by walking the source's syntax trees, so a new message appears with no docs change.
`{...}` in a message stands for a value filled in at run time.
"""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

MARKER = "<!-- error-index -->"
ERRORS = {"ConfigError", "DataError", "CheckpointError", "StoreError", "UnknownModelError", "RequestError"}


def _text(node: ast.AST, source: str) -> str:
    """A message argument as its template: constants as written, `{expr}` for values."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v, source) if isinstance(v, ast.Constant) else "{" + ast.get_source_segment(source, v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left, source) + _text(node.right, source)
    return "{" + (ast.get_source_segment(source, node) or "...") + "}"


def messages(package: Path) -> list[tuple[str, str, str, str]]:
    """(kind, status or exit, message template, module:line) for every raise of a user error."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in ERRORS or not node.exc.args:
                continue
            args = node.exc.args
            if name == "RequestError":
                status = ast.get_source_segment(source, args[0]) if args else ""
                text = _text(args[1], source) if len(args) > 1 else ""
                where = f"HTTP {status}" if status.isdigit() else "HTTP 4xx"
            else:
                text, where = _text(args[0], source), "exit 2"
            if not re.sub(r"\{[^{}]*\}", "", text).strip(" :"):
                continue  # a lower layer's message passed on as it is (listed where it is raised)
            rows.append((name, where, text, f"{path.relative_to(package.parent)}:{node.lineno}"))
    return sorted(rows, key=lambda r: (r[3].split(":")[0], int(r[3].split(":")[1])))


def render(package: Path) -> str:
    out = ["| error | answer | message (`{...}`: filled in at run time) | raised at |", "|---|---|---|---|"]
    for kind, where, text, at in messages(package):
        cell = html.escape(" ".join(text.split())).replace("|", "&#124;")
        out.append(f"| {kind} | {where} | <code>{cell}</code> | `{at}` |")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook signature
    if MARKER not in markdown:
        return markdown
    import cnnray

    return markdown.replace(MARKER, render(Path(cnnray.__file__).parent))
