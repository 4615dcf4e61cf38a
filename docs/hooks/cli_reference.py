"""MkDocs hook: the command-line reference page, built from cnnray's argparse parser.

mkdocs.yml names this file under `hooks:`. At build time it calls `cnnray.cli.build_parser()`
(the one function that builds the whole `cnnray` parser, plug-in subcommands included) and
walks every subparser, so a new subcommand or flag appears on reference.md with no docs
change and the page can never drift from `--help`. The page's Markdown source holds only
the marker `<!-- cli-reference -->`, which this hook replaces.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Iterator

MARKER = "<!-- cli-reference -->"


def subcommands(parser: argparse.ArgumentParser, prefix: str = "cnnray") -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Yield (full command, one-line help, parser) for every subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", helps.get(name, ""), sub
                yield from subcommands(sub, f"{prefix} {name}")


def option_rows(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, str]]:
    """Yield (flags, help, default) for every argument of `parser`, in --help's order."""
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        # The value's name as --help shows it: the metavar, else the choices, else DEST.
        choices = "{" + ",".join(map(str, a.choices)) + "}" if a.choices is not None else None
        value = a.metavar or choices or (a.dest.upper() if a.option_strings else a.dest)
        flags = ", ".join(a.option_strings) if a.option_strings else str(value)
        if a.option_strings and a.nargs != 0:
            flags += f" {value}"
        default = a.default
        shown = "" if default in (None, argparse.SUPPRESS) or a.nargs == 0 else str(default)
        if a.required and a.option_strings:
            shown = "required"
        yield flags, parser._get_formatter()._expand_help(a) if a.help else "", shown


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "&#124;").replace("\n", " ")


def render(parser: argparse.ArgumentParser) -> str:
    out = [f"Generated from `cnnray.cli.build_parser()` when the site is built: the same text as "
           f"`cnnray COMMAND --help`.\n", "```text", parser.format_usage().strip(), "```\n"]
    for command, summary, sub in subcommands(parser):
        out += [f"## `{command}`\n", _cell(sub.description or summary) + "\n",
                "```text", sub.format_usage().strip(), "```\n",
                "| option | meaning | default |", "|---|---|---|"]
        for flags, text, default in option_rows(sub):
            shown = f"<code>{_cell(default)}</code>" if default and default != "required" else default
            out.append(f"| <code>{_cell(flags)}</code> | {_cell(text)} | {shown} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook signature
    if MARKER not in markdown:
        return markdown
    from cnnray.cli import build_parser

    return markdown.replace(MARKER, render(build_parser()))
