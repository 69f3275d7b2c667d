"""One self-contained HTML evaluation report per run: images embedded as data URIs so the single file renders in
MLflow's artifact view (and anywhere else) without sibling files."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list]  # cells: str, int, float (floats in [0, 1] shown as %, NaN as "–")
    percent: bool = True


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _cell(value, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return html.escape(str(value))


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c, t.percent)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = html.escape(f.caption or f.title)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f.title)}">'
            f"<figcaption>{cap}</figcaption></figure>")


CSS = """body{font-family:sans-serif;margin:16px;color:#222}table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #bbb;padding:2px 6px;font-size:12px;text-align:right}th{background:#eee}
td:first-child{text-align:left}figure{display:inline-block;margin:6px;vertical-align:top}
img{max-width:1100px;border:1px solid #ccc}figcaption{font-size:12px}h2{border-bottom:2px solid #444}"""


def render_report(title: str, meta: dict[str, str], sections: list[Section]) -> str:
    """HTML text of the report: a metadata list, then each section's tables and figures."""
    meta_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{meta_html}</ul>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [_table(t) for t in s.tables]
        parts += [_figure(f) for f in s.figures]
    parts.append("<p style='font-size:11px'>IoU / accuracy in %. Unmatched pseudo-classes count as errors.</p>")
    parts.append("</body></html>")
    return "".join(parts)
