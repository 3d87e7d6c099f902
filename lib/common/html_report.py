"""Self-contained HTML pages: escaped text, tables sortable in the browser, pictures inlined as PNG.

The reports of inference and training are one file each that opens from a cluster's file
browser without a server or a network: no external script, style sheet or font; pictures
are small PNG thumbnails inlined as base64 ``data:`` URIs, and links to full-size files are
relative paths inside the run folder.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

GENERATOR = "microscopy-segmentation-toolkit report"
THUMBNAIL_SIDE = 192  # px, the long side of an inlined thumbnail

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: middle; }
th { background: #eee; }
table.sortable th { cursor: pointer; }
table.sortable th:hover { background: #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { image-rendering: pixelated; display: inline-block; margin: 2px; }
img.chart { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
"""

# Click a header of a "sortable" table: sort its rows by that column (numbers as numbers,
# empty cells last); a second click reverses.
SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, column) {
  th.title = 'click to sort';
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.dataset.down !== '1';
    th.dataset.down = down ? '1' : '0';
    function key(row) {
      var cell = row.cells[column]; var text = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
      var number = parseFloat(text); return text.trim() === '' ? null : (isNaN(number) ? text : number);
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null) return 1; if (y === null) return -1;
      var order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return down ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(value: object, digits: int = 4) -> str:
    """A cell's text: floats with ``digits`` significant digits, NaN and None empty, the rest as is."""
    if value is None:
        return ""
    if isinstance(value, float) or isinstance(value, np.floating):
        return "" if not math.isfinite(float(value)) else f"{float(value):.{digits}g}"
    return str(value)


def png_data_uri(rgb: np.ndarray, side: int | None = THUMBNAIL_SIDE) -> str:
    """``rgb`` (H, W, 3) uint8 as a ``data:image/png;base64,`` URI, shrunk to ``side`` on the long side."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(rgb))
    if side is not None and max(picture.size) > side:
        scale = side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image(uri: str, alt: str, link: str | None = None, css: str = "thumb") -> str:
    """An ``<img>`` of a data URI, wrapped in a link to ``link`` (a relative path) when given."""
    tag = f'<img class="{css}" src="{uri}" alt="{escape(alt)}">'
    return f'<a href="{escape(link)}">{tag}</a>' if link else tag


def table(header: Sequence[str], rows: Iterable[Sequence[str]], sortable: bool = False,
          numeric: Sequence[bool] | None = None) -> str:
    """An HTML table; ``rows`` hold ready HTML per cell (escape text first). ``numeric`` columns align right."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f'<td class="num">{c}</td>' if numeric[k] else f"<td>{c}</td>"
                                      for k, c in enumerate(row)) + "</tr>" for row in rows)
    css = ' class="sortable"' if sortable else ""
    return f"<table{css}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def page(title: str, body: str) -> str:
    """A whole HTML document: ``body`` (ready HTML) with the style and the sorting script inline."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="generator" content="{GENERATOR}">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def ours(text: str) -> bool:
    """Whether an existing HTML file's text was written by :func:`page` (safe to replace)."""
    return f'content="{GENERATOR}"' in text[:2000]


def may_write(target: Path, log: Callable[[str], None]) -> bool:
    """Whether ``target`` is absent or a page this tool wrote; otherwise say so through ``log`` (never replace
    a file the tool did not write)."""
    if not target.exists():
        return True
    try:
        mine = ours(target.read_text(errors="replace"))
    except OSError:
        mine = False
    if not mine:
        log(f"warning: {target} was not written by this tool; no report written (move it away to get one)")
    return mine
