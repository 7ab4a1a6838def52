"""Self-contained ``report.html``: per-case overlay pictures, metric table, training curves.

No plotting library: pictures are PNG (Pillow) embedded as base64, curves are inline SVG.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:6px;text-align:center}figcaption{font-size:90%}
.note{color:#555;font-size:90%}
"""


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metrics_table(metrics: dict, keys=("dice", "jaccard", "recall", "precision", "hd95_mm", "assd_mm")) -> str:
    """HTML table of a ``metrics.json`` dict: one row per case and label, then the summary."""
    rows = []
    head = "<tr><th>case</th><th>label</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    for case_id, per_label in metrics.get("cases", {}).items():
        for label, values in per_label.items():
            cells = "".join(f"<td>{_fmt(values.get(k))}</td>" for k in keys)
            rows.append(f"<tr><td>{html.escape(str(case_id))}</td><td>{label}</td>{cells}</tr>")
    summary = []
    for label, values in metrics.get("summary", {}).items():
        items = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items() if not isinstance(v, dict))
        summary.append(f"<li><b>{label}</b>: {html.escape(items)}</li>")
    return f"<table>{head}{''.join(rows)}</table><ul>{''.join(summary)}</ul>"


def curve_svg(series: dict, title: str, width=520, height=220, log_y=False) -> str:
    """Line chart of ``{name: [(x, y), ...]}`` as inline SVG."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return f"<p class='note'>{html.escape(title)}: no data</p>"
    tr = (lambda v: math.log10(max(v, 1e-8))) if log_y else (lambda v: v)
    xs = [p[0] for p in pts]
    ys = [tr(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    m = 40
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    lines = []
    for n, (name, s) in enumerate(series.items()):
        good = [(x, tr(y)) for x, y in s if y is not None and math.isfinite(y)]
        path = " ".join(f"{m + (x - x0) / (x1 - x0) * (width - 2 * m):.1f},"
                        f"{height - m - (y - y0) / (y1 - y0) * (height - 2 * m):.1f}" for x, y in good)
        c = colours[n % len(colours)]
        lines.append(f"<polyline fill='none' stroke='{c}' stroke-width='1.5' points='{path}'/>"
                     f"<text x='{width - m}' y='{m + 14 * n}' fill='{c}' font-size='11' text-anchor='end'>{html.escape(name)}</text>")
    ylab = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    axes = (f"<line x1='{m}' y1='{height - m}' x2='{width - m}' y2='{height - m}' stroke='#888'/>"
            f"<line x1='{m}' y1='{m}' x2='{m}' y2='{height - m}' stroke='#888'/>"
            f"<text x='{m}' y='{height - m + 14}' font-size='10'>{x0:g}</text>"
            f"<text x='{width - m}' y='{height - m + 14}' font-size='10' text-anchor='end'>{x1:g}</text>"
            f"<text x='{m - 4}' y='{height - m}' font-size='10' text-anchor='end'>{ylab(y0)}</text>"
            f"<text x='{m - 4}' y='{m + 4}' font-size='10' text-anchor='end'>{ylab(y1)}</text>"
            f"<text x='{width / 2}' y='16' font-size='12' text-anchor='middle'>{html.escape(title)}</text>")
    return f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{axes}{''.join(lines)}</svg>"


def write_report(path, title: str, sections: list) -> Path:
    """``sections``: list of (heading, html_fragment). Pictures are embedded, so the file stands alone."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{frag}" for h, frag in sections)
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def figure(image, caption: str) -> str:
    return f"<figure><img src='{png_data_uri(image)}'/><figcaption>{html.escape(caption)}</figcaption></figure>"


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))
