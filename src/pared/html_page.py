"""A tiny builder for the report's self-contained HTML page (and its Markdown tables).

Every text that comes from a report file is escaped; only the builder's own markup is raw
(``Raw``). Figures are inlined as base64 PNG. A short inline script marks the body with how
many figures decoded (``data-figures-loaded``), which the rendering test reads back from
headless Chromium.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1020px;
padding:18px 22px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:4px 0 10px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
tr.pareto td{background:#fff4f2}tr.baseline td{background:#f4f7ff;font-weight:600}tr.peer td{background:#f2fbf3}
figure{margin:14px 0 20px}figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{font-size:13px;color:#333}figcaption .how{display:block;color:#666;font-size:12px}
.note{color:#666;font-style:italic}dl{margin:6px 0}dt{font-weight:600}dd{margin:0 0 6px 18px}
details summary{cursor:pointer;color:#235}code{font-size:12px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('figure img'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  ok.forEach(function (i) { i.closest('figure').setAttribute('data-loaded', 'yes'); });
  document.body.setAttribute('data-figures-loaded', ok.length + '/' + imgs.length);
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table').length));
});
"""


class Raw(str):
    """Markup the builder made itself: inserted as is, never escaped again."""


@dataclass(frozen=True)
class Figure:
    """One plot: a stable key (the test looks for it), PNG bytes, what it shows and how it was measured."""

    key: str
    png: bytes
    caption: str
    method: str


def fmt(value: Any) -> str:
    """A table cell: thousands separators for big numbers, 4 significant digits, n/a for missing."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; ``|`` inside a cell is escaped so that a layer name cannot add columns."""
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Page:
    """Accumulates sections of one HTML document; ``html()`` returns the whole page."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{_esc(title)}</h1>"]
        self.figure_keys: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{_esc(text)}</h2>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{_esc(text)}</p>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_esc(text)}</p>')

    def items(self, texts: Iterable[str]) -> None:
        self.parts.append("<ul>" + "".join(f"<li>{_esc(t)}</li>" for t in texts) + "</ul>")

    def definitions(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.parts.append("<dl>" + "".join(f"<dt>{_esc(a)}</dt><dd>{_esc(b)}</dd>" for a, b in pairs) + "</dl>")

    def link(self, href: str | None, text: Any) -> Raw:
        """An ``<a>`` when ``href`` was vetted (``safe_link``), else the escaped text."""
        if href is None:
            return Raw(_esc(fmt(text)))
        return Raw(f'<a href="{html.escape(href, quote=True)}">{_esc(fmt(text))}</a>')

    def table(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
              *, row_classes: Sequence[str] | None = None, collapsed: str | None = None) -> None:
        """A table with ``data-table=name``; optionally inside a closed ``<details>`` with that summary."""
        rows = list(rows)
        classes = list(row_classes or [""] * len(rows))
        body = "".join(
            (f'<tr class="{html.escape(c, quote=True)}">' if c else "<tr>")
            + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
            for row, c in zip(rows, classes, strict=True)
        )
        table = (f'<table data-table="{html.escape(name, quote=True)}"><thead><tr>'
                 + "".join(f"<th>{_esc(h)}</th>" for h in header) + f"</tr></thead><tbody>{body}</tbody></table>")
        if collapsed is not None:
            table = f"<details><summary>{_esc(collapsed)}</summary>{table}</details>"
        self.parts.append(table)

    def figure(self, fig: Figure) -> None:
        data = base64.b64encode(fig.png).decode("ascii")
        self.figure_keys.append(fig.key)
        self.parts.append(
            f'<figure data-figure="{html.escape(fig.key, quote=True)}">'
            f'<img alt="{html.escape(fig.caption, quote=True)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(fig.caption)}<span class=\"how\">How measured: {_esc(fig.method)}</span></figcaption>"
            "</figure>"
        )

    def html(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(self.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(self.parts)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
        )


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: Any) -> str:
    return value if isinstance(value, Raw) else _esc(fmt(value))
