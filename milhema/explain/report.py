"""One self-contained HTML report per patient: images as base64 data URIs, inline CSS, no links out."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from milhema.data.cbc import cbc_flag

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:2px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.bar{background:#4a78c2;height:12px;display:inline-block;vertical-align:middle}
.low{color:#1f5fbf;font-weight:bold}.high{color:#c0392b;font-weight:bold}.missing{color:#999}
.pred{font-weight:bold}.meta{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #eee;margin:4px 0}
figure{margin:8px 0}figcaption{font-size:.85em;color:#555}
"""


@dataclass
class ReportContent:
    """What goes into a patient report. Images are ``(caption, png bytes)`` pairs."""

    patient_id: str
    classes: Sequence[str]
    probs: np.ndarray
    label: str | None
    cbc: Mapping[str, float]
    method: str
    run: str
    model: str
    fusion: str
    backbone: str
    date: str
    n_cells: int
    n_models: int
    # (type, cells, cells among the most attended) from the bags' cell types; empty without types.
    cell_types: list[tuple[str, int, int]] = field(default_factory=list)
    top_k: int = 0
    heatmaps: list[tuple[str, bytes]] = field(default_factory=list)
    galleries: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in the HTML itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figures(items: Sequence[tuple[str, bytes]]) -> str:
    return "".join(f'<figure><img alt="{html.escape(c)}" src="{data_uri(png)}"><figcaption>{html.escape(c)}'
                   "</figcaption></figure>" for c, png in items)


def render_report(c: ReportContent) -> str:
    """The HTML text of one patient's report."""
    e = html.escape
    pred = int(np.argmax(c.probs)) if len(c.probs) else -1
    prob_rows = "".join(
        f'<tr class="{"pred" if k == pred else ""}"><td>{e(name)}</td><td>{p:.3f}</td>'
        f'<td><span class="bar" style="width:{max(1, round(200 * p))}px"></span></td></tr>'
        for k, (name, p) in enumerate(zip(c.classes, c.probs, strict=True)))
    cbc_rows = ""
    for column, value in c.cbc.items():
        flag, reference = cbc_flag(column, value)
        shown = "—" if flag == "missing" else f"{value:g}"
        cbc_rows += (f'<tr><td>{e(column)}</td><td class="{flag}">{e(shown)}</td><td>{e(reference)}</td>'
                     f'<td class="{flag}">{e(flag)}</td></tr>')
    cbc_html = (f"<table><tr><th>feature</th><th>value</th><th>reference</th><th>flag</th></tr>{cbc_rows}</table>"
                if cbc_rows else "<p>No patient features (CBC) in the run's config.</p>")
    type_rows = "".join(f"<tr><td>{e(name)}</td><td>{n}</td><td>{100 * n / max(c.n_cells, 1):.1f} %</td><td>{top}</td></tr>"
                        for name, n, top in c.cell_types)
    types_html = (f"<h2>Cells by type</h2><p class=\"meta\">As annotated in the bags (analyser folders, cells.csv);"
                  f" the last column counts them among the {c.top_k} most attended cells.</p>"
                  f"<table><tr><th>cell type</th><th>cells</th><th>share</th><th>top {c.top_k}</th></tr>"
                  f"{type_rows}</table>" if type_rows else "")
    truth = e(c.label) if c.label else "unknown"
    notes = "".join(f"<li>{e(n)}</li>" for n in c.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>milhema: patient {e(c.patient_id)}</title>
<style>{_CSS}</style></head><body>
<h1>Patient {e(c.patient_id)}</h1>
<p class="meta">Generated {e(c.date)} by milhema explain ({e(c.method)} scores) from run <code>{e(c.run)}</code>:
model {e(c.model)}, CBC fusion {e(c.fusion)}, backbone {e(c.backbone)}; {c.n_models} model(s) averaged
(out-of-fold for patients of a cv run); {c.n_cells} cells.</p>
<h2>Prediction</h2>
<p>Predicted: <b>{e(c.classes[pred]) if pred >= 0 else "—"}</b>. True label: {truth}.</p>
<table><tr><th>class</th><th>probability</th><th></th></tr>{prob_rows}</table>
<h2>Blood count and patient features</h2>{cbc_html}
{types_html}
<h2>Where the model looked</h2>{_figures(c.heatmaps)}
<h2>Cell galleries</h2>{_figures(c.galleries)}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p class="meta">Research software: not a medical device; cell scores show what drove the model, not a diagnosis.</p>
</body></html>
"""
