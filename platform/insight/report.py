"""A self-contained HTML report of a pipeline run: pictures inline, no network needed.

The quickstart writes one after it has run every step; any step's outputs can
be handed in. Images are embedded as data URIs so the single file can be
mailed, attached to an MLflow run or opened offline.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    table: list[dict[str, Any]] | None = None
    code: str | None = None


def _img(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    cap = html.escape(fig.caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption>'
            "</figure>")


_NUMBER = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


def number(v: float) -> str:
    """A float as a person reads it: 3 significant digits; thousands as whole numbers (29,400)."""
    if math.isfinite(v) and 1000 <= abs(v) < 1e9:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _fmt(v: Any) -> str:
    """One table cell; floats (and decimal numbers read from CSV files as text) are rounded for reading."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return number(v)
    if isinstance(v, str) and "." in v and _NUMBER.fullmatch(v.strip()):
        return number(float(v))
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v)[:200])
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>empty</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;line-height:1.45;padding:0 1rem}
h1{font-size:1.7rem;margin-bottom:.2rem} h2{border-bottom:1px solid #dde;padding-bottom:.2rem;margin-top:2.2rem}
.meta{color:#667;font-size:.9rem} figure{display:inline-block;margin:.5rem;vertical-align:top;max-width:100%}
figure img{max-width:520px;max-height:520px;border:1px solid #ccd;border-radius:4px}
figcaption{font-size:.85rem;color:#556;max-width:520px}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{border:1px solid #ccd;padding:.25rem .5rem;
text-align:left} th{background:#f1f3f8} pre{background:#f6f7fa;padding:.7rem;border-radius:4px;overflow:auto}
"""


def write_report(path: str | os.PathLike, title: str, summary: str, sections: list[Section],
                 meta: dict[str, Any] | None = None) -> Path:
    """Write the report atomically; missing figure files are listed, not fatal."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p>{html.escape(summary)}</p>"]
    if meta:
        parts.append("<p class='meta'>" + " · ".join(f"<b>{html.escape(k)}</b>: {_fmt(v)}" for k, v in meta.items())
                     + "</p>")
    parts.append("<nav><ol>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>"
                                       for i, s in enumerate(sections)) + "</ol></nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        missing = [f for f in s.figures if not Path(f.path).is_file()]
        parts.extend(_img(f) for f in s.figures if Path(f.path).is_file())
        if missing:
            parts.append("<p><em>missing: " + ", ".join(html.escape(str(f.path)) for f in missing) + "</em></p>")
        if s.table is not None:
            parts.append(_table(s.table))
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    from insight.atomic import write_atomic

    return write_atomic(out, "".join(parts).encode("utf-8"))
