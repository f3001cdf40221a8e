"""One self-contained HTML report per patient: images as base64 data URIs, inline CSS, no links out."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from milhema.data.cbc import ADULT_AGE, SEX_NAMES, cbc_flag, normalise_sex
from milhema.data.differential import NO_TYPE, DifferentialRow

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:2px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.bar{background:#4a78c2;height:12px;display:inline-block;vertical-align:middle}
.low{color:#1f5fbf;font-weight:bold}.high{color:#c0392b;font-weight:bold}.missing{color:#999}
.pred{font-weight:bold}.meta{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #eee;margin:4px 0}
figure{margin:8px 0}figcaption{font-size:.85em;color:#555}.num{text-align:right}
.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.side>div{flex:0 1 440px}.side>div+div{flex:1 1 560px}
.nw{white-space:nowrap}
.group td{font-style:italic}.notice{background:#fff6dd;border-left:4px solid #e0a800;padding:6px 10px}
"""


@dataclass
class ReportContent:
    """What goes into a patient report. Images are ``(caption, png bytes)`` pairs.

    ``features`` names the feature blocks the model read; ``sex`` (any spelling of patients.csv)
    and ``age`` pick the CBC reference ranges; ``differential`` holds the annotated cells' counts
    (empty without cell types) and ``top`` their numbers among the ``top_k`` most attended (None
    when the scores single out no cell, as ``ranking`` then says).
    """

    patient_id: str
    classes: Sequence[str]
    probs: np.ndarray
    label: str | None
    cbc: Mapping[str, float]
    method: str
    run: str
    model: str
    fusion: str
    features: str
    date: str
    n_cells: int
    n_models: int
    sex: str | None = None
    age: float | None = None
    differential: list[DifferentialRow] = field(default_factory=list)
    differential_source: str = "annotated"
    top: Mapping[str, int] | None = None
    top_k: int = 0
    ranking: str = ""
    singled_out: bool = True
    heatmaps: list[tuple[str, bytes]] = field(default_factory=list)
    galleries: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in the HTML itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figures(items: Sequence[tuple[str, bytes]]) -> str:
    return "".join(f'<figure><img alt="{html.escape(c)}" src="{data_uri(png)}"><figcaption>{html.escape(c)}'
                   "</figcaption></figure>" for c, png in items)


def patient_line(sex: str | None, age: float | None) -> str:
    """``female, 72 years`` / ``sex not given, age not given`` for the report's header (plain text)."""
    code = normalise_sex(sex)
    sex_text = SEX_NAMES[code] if code else (f"sex {sex!r} not recognised" if sex else "sex not given")
    if age is None or not math.isfinite(age):
        age_text = "age not given"
    else:
        age_text = f"{age:g} years" + (" (child: adult CBC ranges not applied)" if age < ADULT_AGE else "")
    return f"{sex_text}, {age_text}"


def _cbc_html(c: ReportContent) -> str:
    e = html.escape
    rows = ""
    for column, value in c.cbc.items():
        flag, reference = cbc_flag(column, value, c.sex, c.age)
        shown = "—" if flag == "missing" else f"{value:g}"
        rows += (f'<tr><td>{e(column)}</td><td class="num {flag}">{e(shown)}</td><td>{e(reference)}</td>'
                 f'<td class="{flag}">{e(flag)}</td></tr>')
    if not rows:
        return "<p>No patient features (CBC) in the run's config.</p>"
    code = normalise_sex(c.sex)
    basis = ("women's" if code == "F" else "men's") if code else "sex-neutral (sex not known: women's lower, men's upper limit)"
    note = (f"Hb, RBC and Hct against the {basis} adult ranges; the other ranges are for adults of either sex "
            "(docs/DOMAIN.md).")
    return (f"<table><tr><th>feature</th><th>value</th><th>reference</th><th>flag</th></tr>{rows}</table>"
            f'<p class="meta">{e(note)}</p>')


def _pct(value: float) -> str:
    return f"{value:.1f} %" if math.isfinite(value) else "—"


def _differential_note(source: str, counted: float) -> str:
    if source == "annotated":
        return (f"Annotated cell types of the bags (analyser folders, cells.csv), in % of the {counted:g} counted "
                "white cells (smudge cells, unmatched detections and untyped cells are listed, not counted); "
                "95 % Wilson intervals.")
    return (f"Cell types {source} (milhema cells predict): n is the expected number of cells (probabilities "
            f"summed), in % of the {counted:.1f} expected counted white cells; the 95 % intervals add the "
            "classifier's uncertainty to the sampling of cells (docs/DOMAIN.md, the differential count).")


def _differential_html(c: ReportContent) -> str:
    e = html.escape
    if not c.differential:
        return "<p>No cell types in the bags: no differential.</p>"
    top_head = f"<th>top {c.top_k}</th>" if c.top is not None else ""
    rows = ""
    for r in c.differential:
        ci = f"{r.ci_low:.1f}–{r.ci_high:.1f} %" if r.counted else "not counted"
        flag = e(r.flag)
        if r.flag and r.below_in_ci:
            flag += f" <span class=\"meta\">(CI reaches below {r.threshold:g} %)</span>"
        top = ""
        if c.top is not None:
            name = "" if r.name == NO_TYPE else r.name
            top = f'<td class="num">{"" if r.group else c.top.get(name, 0)}</td>'
        title = f' title="{e(r.meaning)}"' if r.meaning else ""
        n = f"{r.n:g}" if float(r.n).is_integer() else f"{r.n:.1f}"
        rows += (f'<tr class="{"group" if r.group else ""}"><td>{e(r.name)}</td><td class="num">{n}</td>'
                 f'<td class="num nw">{_pct(r.percent)}</td><td class="nw">{ci}</td>{top}'
                 f'<td class="{"high" if r.flag else ""}"{title}>{flag}</td></tr>')
    counted = next((r.of for r in c.differential if not r.group), 0)
    meanings = "".join(f"<li>{e(r.name)}: {e(r.meaning)}</li>" for r in c.differential if r.flag)
    top_note = (f" The top {c.top_k} column counts them among the cells of the “highest” gallery."
                if c.top is not None else " No top-k column: the model did not single out cells.")
    return (f"<table><tr><th>cell type</th><th>n</th><th>%</th><th>95 % CI</th>{top_head}<th>flag</th></tr>"
            f"{rows}</table>"
            f'<p class="meta">{e(_differential_note(c.differential_source, counted))} Italic rows are the groups '
            f"the thresholds apply to.{e(top_note)}</p>"
            + (f'<ul class="meta">{meanings}</ul>' if meanings else ""))


def render_report(c: ReportContent) -> str:
    """The HTML text of one patient's report."""
    e = html.escape
    pred = int(np.argmax(c.probs)) if len(c.probs) else -1
    prob_rows = "".join(
        f'<tr class="{"pred" if k == pred else ""}"><td>{e(name)}</td><td>{p:.3f}</td>'
        f'<td><span class="bar" style="width:{max(1, round(200 * p))}px"></span></td></tr>'
        for k, (name, p) in enumerate(zip(c.classes, c.probs, strict=True)))
    truth = e(c.label) if c.label else "unknown"
    notes = "".join(f"<li>{e(n)}</li>" for n in c.notes)
    ranking = (f'<p class="notice">{e(c.ranking[:1].upper() + c.ranking[1:])}. The figures below show the cells '
               "without ranking them.</p>" if not c.singled_out and c.ranking
               else f'<p class="meta">{e(c.ranking[:1].upper() + c.ranking[1:])}.</p>' if c.ranking else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>milhema: patient {e(c.patient_id)}</title>
<style>{_CSS}</style></head><body>
<h1>Patient {e(c.patient_id)}</h1>
<p><b>{e(patient_line(c.sex, c.age))}</b></p>
<p class="meta">Generated {e(c.date)} by milhema explain ({e(c.method)} scores) from run <code>{e(c.run)}</code>:
model {e(c.model)}, CBC fusion {e(c.fusion)}, features read: {e(c.features)}; {c.n_models} model(s) averaged
(out-of-fold for patients of a cv run); {c.n_cells} cells.</p>
<h2>Prediction</h2>
<p>Predicted: <b>{e(c.classes[pred]) if pred >= 0 else "—"}</b>. True label: {truth}.</p>
<table><tr><th>class</th><th>probability</th><th></th></tr>{prob_rows}</table>
<h2>Blood count and differential</h2>
<div class="side"><div><h3>Blood count and patient features</h3>{_cbc_html(c)}</div>
<div><h3>Differential (formule leucocytaire) of the {"annotated" if c.differential_source == "annotated"
 else "predicted"} cells</h3>{_differential_html(c)}</div></div>
<h2>Where the model looked</h2>{ranking}{_figures(c.heatmaps)}
<h2>Cell galleries</h2>{_figures(c.galleries)}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p class="meta">Research software: not a medical device; cell scores show what drove the model, not a diagnosis.</p>
</body></html>
"""
