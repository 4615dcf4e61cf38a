"""One self-contained HTML page: inline CSS, PNGs embedded as base64 data URIs (each also
linked to its file beside the page), no scripts and nothing fetched from elsewhere, so
the page opens from disk, from an e-mail attachment or from a copied run folder alike.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from cnnray.checkpoint import atomic_write_bytes

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em 4em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.sub { color: #666; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 9em; }
.card b { display: block; font-size: 1.5em; }
.card span { color: #666; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.flat td { font-style: italic; background: #fafafa; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
ul.findings li { margin: 0.3em 0; }
"""


@dataclass(frozen=True)
class Section:
    title: str
    body: str  # HTML


def figure(png: Path, caption: str, alt: str | None = None) -> str:
    """An embedded PNG (base64), linked to the file of the same name beside the page."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    name = escape(Path(png).name)
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" alt="{escape(alt or caption)}"></a>'
        f"<figcaption>{escape(caption)} <a href=\"{name}\">({name})</a></figcaption></figure>"
    )


def row(*fragments: str) -> str:
    """HTML fragments side by side (wrapping on narrow screens)."""
    return '<div class="row">' + "".join(f"<div>{f}</div>" for f in fragments) + "</div>"


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def bullet_list(items: Iterable[str], cls: str = "findings") -> str:
    return f'<ul class="{cls}">' + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>"


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Big numbers with a small label under each: (value, label)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in items
    ) + "</div>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A plain table; the columns listed in `numeric` are right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td{" class=n" if i in numeric else ""}>{escape(str(c))}</td>' for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def layer_table(rows: Sequence[Any], input_shape: Sequence[int]) -> str:
    """`cnnray.models.layer_table` rows in the lecture's VGG19 table format: row 0 the
    input, a "Flattening" line before the first fully connected layer, totals at the end."""
    dims = lambda shape: " x ".join(f"{d:,}" for d in shape)  # noqa: E731 (the lecture's "64 x 224 x 224")
    header = ("Layer No.", "Type of Layer", "Output Dimension", "No. of Neurons", "No. of Learned Parameters")
    out = ["<table><thead><tr>", *(f"<th>{h}</th>" for h in header), "</tr></thead><tbody>"]
    out.append(f"<tr><td class=n>0</td><td>Input</td><td>{dims(input_shape)}</td><td class=n>-</td><td class=n>-</td></tr>")
    previous: tuple[int, ...] = tuple(input_shape)
    for r in rows:
        if r.kind == "Fully connected" and len(previous) > 1:
            out.append(f'<tr class="flat"><td colspan="5">Flattening to a vector of length {math.prod(previous):,}</td></tr>')
        out.append(
            f"<tr><td class=n>{r.index}</td><td>{escape(r.kind)}</td><td>{dims(r.output_shape)}</td>"
            f"<td class=n>{r.neurons:,}</td><td class=n>{r.params:,}</td></tr>"
        )
        previous = tuple(r.output_shape)
    out.append(
        f"<tr><td></td><td></td><td></td><td class=n>Total: {sum(r.neurons for r in rows):,}</td>"
        f"<td class=n>Total: {sum(r.params for r in rows):,}</td></tr></tbody></table>"
    )
    return "".join(out)


def page(title: str, subtitle: str, header_html: str, sections: Sequence[Section]) -> str:
    toc = " · ".join(f'<a href="#s{i}">{escape(s.title)}</a>' for i, s in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{escape(s.title)}</h2>{s.body}' for i, s in enumerate(sections))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(subtitle)}</p>{header_html}"
        f"<p>{toc}</p>{body}</body></html>\n"
    )


def write_page(html_text: str, path: Path) -> Path:
    """Write atomically so a browser refreshing during a rerun never sees half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(html_text.encode("utf-8"), path)
    return path
