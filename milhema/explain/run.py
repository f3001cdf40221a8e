"""``milhema explain``: scores, figures, GeoJSON and an HTML report per patient, plus a cohort overview.

Output folder (written atomically)::

    <out>/summary.json            method, run, per-patient prediction, faithfulness (if bags carry truth)
    <out>/overview.png            PCA of all explained cells (score percentile, cell type)
    <out>/<patient_id>/cell_scores.csv, differential.csv (bags with cell types), gallery.png, gallery_<class>.png,
                      heatmap_<slide>.png (scans),
                      heatmap_<slide>_field<k>.png (one per photographed field, k = the bag's field index)
                      or mosaic.png (crops), <slide_id>.geojson / <slide_id>_field<k>.geojson, report.html
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from milhema.bags import read_bag_attrs
from milhema.data.cbc import normalise_sex
from milhema.data.differential import NO_TYPE, DifferentialRow, differential
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.differential import pooled_predictions, predicted_differential, read_slide_predictions
from milhema.errors import MilhemaError
from milhema.explain import figures
from milhema.explain.cells import PatientCells, patient_cells
from milhema.explain.geojson import slide_geojson
from milhema.explain.report import ReportContent, render_report
from milhema.explain.scores import Contrast, PatientScores, explain_scores, score_contrast
from milhema.io import atomic_folder, check_new_folder, write_csv, write_text
from milhema.slides.fields import FieldImage, list_fields
from milhema.slides.wsi import WholeSlide
from milhema.train.metrics import diagnostic_auroc
from milhema.train.outputs import rank_percentiles
from milhema.train.predict import load_run


def cell_rows(cells: PatientCells, s: PatientScores, pct: np.ndarray,
              classes: Sequence[str]) -> tuple[list[str], list[list[object]]]:
    """Header and rows of ``cell_scores.csv`` (one row per cell, in bag order)."""
    class_scores = s.class_scores
    k = 0 if class_scores is None else class_scores.shape[1]
    header = ["slide_id", "cell_id", "x", "y", "score", "rank_pct"]
    header += ["cell_type"] if cells.cell_types is not None else []
    in_fields = bool(cells.field_names)
    header += ["field"] if in_fields else []
    header += [f"score_{c}" for c in classes] if k else []
    rows = []
    for i in range(cells.n_cells):
        row: list[object] = [cells.slide_ids[i], cells.cell_ids[i], _num(cells.coords[i, 0]),
                             _num(cells.coords[i, 1]), f"{s.scores[i]:.6g}", f"{pct[i]:.2f}"]
        if cells.cell_types is not None:
            row.append(cells.cell_types[i])
        if in_fields:
            k = int(cells.field[i])
            row.append(cells.field_names[cells.slide_ids[i]][k] if k >= 0 else "")
        if class_scores is not None:
            row += [f"{v:.6g}" for v in class_scores[i]]
        rows.append(row)
    return header, rows


def top_counts(cell_types: np.ndarray | None, scores: np.ndarray, k: int) -> dict[str, int]:
    """Cells of each type (``""`` = no type) among the ``k`` highest ``scores``."""
    if cell_types is None or not len(cell_types) or k < 1:
        return {}
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return dict(Counter(str(t) for t in np.asarray(cell_types, object)[top]))


def patient_differential(cohort: Cohort, bags: Path | None, patient_id: str, annotated: np.ndarray | None,
                         n_cells: int) -> tuple[list[DifferentialRow], str, np.ndarray | None]:
    """The patient's differential, what it was counted from, and one type per cell (for top-k counts).

    A cell classifier's predictions (``milhema cells predict``) on every slide of the patient win:
    expected counts with intervals holding the classifier's uncertainty, each cell typed by its
    most probable type. Otherwise the annotated types (analyser folders, ``cells.csv``), counted,
    with Wilson intervals. ``([], "", None)`` when neither exists.
    """
    found = read_slide_predictions(cohort, bags, [patient_id], required=False).get(patient_id, [])
    if n_cells and found and len(found) == len(cohort.slides_of(patient_id)):
        names, probs = pooled_predictions(found)
        if len(probs) == n_cells:
            source = f"predicted by cell classifier {found[0].predictions.classifier_sha256[:12]}"
            return predicted_differential(names, probs), source, np.asarray(names, object)[probs.argmax(axis=1)]
    if annotated is not None and n_cells:
        return differential(annotated), "annotated", annotated
    return [], "", None


def differential_rows(rows: Sequence[DifferentialRow], top: Mapping[str, int] | None,
                      k: int) -> tuple[list[str], list[list[object]]]:
    """Header and rows of ``differential.csv``: the patient's differential (see
    :func:`milhema.data.differential.differential`), with the cells of each type among the ``k``
    most attended where the scores single out cells (``top``; None: the column stays empty)."""
    header = ["cell_type", "group", "n", "of", "percent", "ci95_low", "ci95_high", "top_k", "in_top_k", "flag",
              "meaning"]
    out: list[list[object]] = []
    for r in rows:
        name = "" if r.name == NO_TYPE else r.name
        in_top = "" if top is None or r.group else top.get(name, 0)
        out.append([r.name, "yes" if r.group else "", _count(r.n), _count(r.of), _pct(r.percent), _pct(r.ci_low), _pct(r.ci_high),
                    k if top is not None else "", in_top, r.flag, r.meaning])
    return header, out


def features_used(blocks: Sequence[str] | None, layout: str, backbone: str,
                  feature_dim: int) -> tuple[list[str], str]:
    """The feature blocks a model read and a sentence naming them for the report.

    ``blocks`` is the run's ``data.feature_blocks`` (None: all), ``layout`` a bag's
    ``feature_blocks`` attribute (``"timm/resnet18:512,morphology:16"``; empty for bags not
    embedded by milhema), ``backbone`` and ``feature_dim`` what the bags were checked against.
    """
    parsed: list[tuple[str, int]] = []
    for item in filter(None, layout.split(",")):
        name, _, size = item.rpartition(":")
        parsed.append((name, int(size)) if size.isdigit() else (item, 0))
    if not parsed:
        return [backbone], f"{backbone} ({_per_cell(feature_dim)})"
    used = [(n, d) for n, d in parsed if not blocks or n in blocks]
    unused = [(n, d) for n, d in parsed if blocks and n not in blocks]
    if len(used) == 1:
        text = f"{used[0][0]} ({_per_cell(used[0][1])})"
    else:
        text = " + ".join(f"{n} ({d})" for n, d in used) + f" = {_per_cell(sum(d for _, d in used))}"
    if unused:
        text += ("; not read: " + ", ".join(f"{n} ({d})" for n, d in unused)
                 + " (data.feature_blocks: " + ", ".join(blocks or []) + ")")
    return [n for n, _ in used], text


def _per_cell(n: int) -> str:
    return f"{n} feature{'' if n == 1 else 's'} per cell"


def _pct(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else ""


def _num(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else ""


def run_explain(run: str | Path, cohort: Cohort, bags: str | Path | None, out: str | Path, *,
                patients: Sequence[str] | None = None, method: str = "attention", top_k: int = 16,
                overwrite: bool = False, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Explain the predictions of ``run`` for ``patients`` (default: every patient with slides).

    Returns the summary written to ``summary.json``.
    """
    run, out = Path(run), Path(out)
    bags = None if bags is None else Path(bags)
    check_new_folder(out, overwrite=overwrite, what="output folder")
    if top_k < 1:
        raise MilhemaError(f"--top-k must be at least 1, got {top_k}")
    if patients:
        unknown = [p for p in patients if p not in cohort.patients]
        if unknown:
            raise MilhemaError(f"patient(s) {', '.join(unknown)} not in {cohort.root / 'patients.csv'}")
        ids = list(dict.fromkeys(patients))
    else:
        ids = [p for p in cohort.patient_ids if cohort.slides_of(p)]
    if not ids:
        raise MilhemaError("no patient with slides to explain")
    loaded = load_run(run, cohort, bags, ids)
    scores = explain_scores(loaded, ids, resolve_device(device), method)
    classes = loaded.classes
    spec = loaded.models[0][1]["spec"]
    patient_features = list(loaded.settings.data.patient_features)
    first = cohort.slides_of(ids[0])[0] if cohort.slides_of(ids[0]) else None
    layout = "" if first is None else str(read_bag_attrs(first.bag_path(bags)).get("feature_blocks", ""))
    blocks_used, features_text = features_used(loaded.settings.data.feature_blocks, layout, loaded.info.backbone,
                                               loaded.info.feature_dim)
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    all_features, all_pct, all_types, truth, by_patient = [], [], [], {}, {}
    any_types = False
    notes_global: list[str] = []
    with atomic_folder(out, overwrite=overwrite, what="output folder") as tmp:
        for pid in tqdm(ids, desc=f"explain ({method})", unit="patient", disable=None if progress else True):
            bag = loaded.store.get(pid)
            cells = patient_cells(cohort, bags, bag)
            s = scores[pid]
            pct = rank_percentiles(s.scores)
            contrast = score_contrast(s.scores, method)
            folder = tmp / pid
            header, rows = cell_rows(cells, s, pct, classes)
            write_csv(folder / "cell_scores.csv", header, rows)
            heatmaps, galleries, notes = _figures(cohort, pid, cells, s, pct, classes, top_k, folder, method,
                                                  contrast)
            notes_global += [f"{pid}: {n}" for n in notes]
            k = figures.gallery_k(cells.n_cells, top_k)
            diff, diff_source, typed = patient_differential(cohort, bags, pid, cells.cell_types, cells.n_cells)
            top = top_counts(typed, s.scores, k) if contrast.singled_out else None
            if diff:
                write_csv(folder / "differential.csv", *differential_rows(diff, top, k))
            probs = s.probs
            patient = cohort.patients[pid]
            content = ReportContent(
                patient_id=pid, classes=classes, probs=probs, label=patient.label,
                cbc={c: float(patient.values.get(c, float("nan"))) for c in patient_features}, method=method,
                run=str(run), model=str(spec["model"]), fusion=str(spec["fusion"]), features=features_text,
                date=date, n_cells=cells.n_cells, n_models=s.n_models, sex=patient.sex, age=patient.age,
                heatmaps=heatmaps, galleries=galleries, notes=notes, differential=diff, top=top, top_k=k,
                differential_source=diff_source,
                ranking=contrast.text, singled_out=contrast.singled_out)
            write_text(folder / "report.html", render_report(content))
            all_features.append(np.asarray(cells.features, np.float32))
            all_pct.append(pct)
            any_types = any_types or cells.cell_types is not None
            all_types.append(cells.cell_types if cells.cell_types is not None else np.full(cells.n_cells, "", object))
            truth[pid] = cells.diagnostic
            by_patient[pid] = {"label": patient.label, "pred": classes[int(np.argmax(probs))],
                               "probs": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
                               "n_cells": cells.n_cells, "n_models": s.n_models, "sex": normalise_sex(patient.sex),
                               "age": patient.age, "scores": _contrast_json(contrast),
                               "differential": [_row_json(r) for r in diff] if diff else None,
                               "differential_source": diff_source if diff else None}
        if sum(len(f) for f in all_features):
            png = figures.overview(np.concatenate(all_features), np.concatenate(all_pct),
                                   np.concatenate(all_types) if any_types else None,
                                   f"{len(ids)} patients, {method} scores: PCA of cell features")
            (tmp / "overview.png").write_bytes(png)
        summary: dict[str, Any] = {"method": method, "run": str(run), "model": spec["model"], "fusion": spec["fusion"],
                                   "backbone": loaded.info.backbone, "feature_blocks": blocks_used,
                                   "features": features_text, "classes": classes, "n_patients": len(ids),
                                   "date": date, "patients": by_patient, "notes": notes_global}
        if any(t is not None for t in truth.values()):
            summary["faithfulness"] = {"diagnostic_auroc": diagnostic_auroc(
                {p: scores[p].scores for p in ids}, truth), "method": method}
        write_text(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _contrast_json(c: Contrast) -> dict[str, Any]:
    return {"singled_out": c.singled_out, "statistic": _finite(c.statistic), "entropy": _finite(c.entropy),
            "text": c.text}


def _count(n: float) -> int | float:
    """A count as an integer, an expected count (a classifier's) to one decimal."""
    return int(n) if float(n).is_integer() else round(float(n), 1)


def _row_json(r: DifferentialRow) -> dict[str, Any]:
    return {"cell_type": r.name, "group": r.group, "n": _count(r.n), "of": _count(r.of), "percent": _finite(r.percent, 2),
            "ci95": [_finite(r.ci_low, 2), _finite(r.ci_high, 2)], "flag": r.flag}


def _finite(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if np.isfinite(value) else None


def _figures(cohort: Cohort, pid: str, cells: PatientCells, s: PatientScores, pct: np.ndarray,
             classes: Sequence[str], top_k: int, folder: Path, method: str,
             contrast: Contrast) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[str]]:
    """Write the patient's PNGs and GeoJSON; return (heatmaps, galleries, notes) for the report."""
    heatmaps: list[tuple[str, bytes]] = []
    galleries: list[tuple[str, bytes]] = []
    notes: list[str] = []
    if cells.n_cells == 0:
        return heatmaps, galleries, ["no cells in this patient's bags"]
    if cells.thumbnails is None:
        notes.append("the bags hold no thumbnails: galleries show grey tiles")
    ranked = contrast.singled_out
    png = figures.gallery(cells.thumbnails, s.scores, cells.cell_types, top_k, f"{pid} ({method})", ranked=ranked)
    (folder / "gallery.png").write_bytes(png)
    k = figures.gallery_k(cells.n_cells, top_k)
    if ranked:
        caption = f"the {k} highest and the {k} lowest cells by {method} score"
        if k < top_k:
            caption += f" (k = min(--top-k {top_k}, {cells.n_cells} cells ÷ 2), so that no cell is shown twice)"
    else:
        caption = (f"{contrast.text}: {min(top_k, cells.n_cells)} cells spread over the bag, in bag order, "
                   "instead of a ranking")
    galleries.append((caption, png))
    if s.class_scores is not None:
        galleries += _class_galleries(pid, cells, s.class_scores, classes, top_k, folder, method)
    slides = {sl.slide_id: sl for sl in cohort.slides_of(pid)}
    crop_cells = np.zeros(cells.n_cells, bool)
    for slide_id in dict.fromkeys(cells.slide_ids.tolist()):
        sel = cells.slide_ids == slide_id
        if not np.isfinite(cells.coords[sel]).all():
            crop_cells |= sel
            continue
        slide = slides[slide_id]
        if slide_id in cells.field_names:
            _field_figures(pid, slide_id, slide.source, slide.mpp, cells, s, pct, classes, top_k, folder, method,
                           heatmaps, notes, ranked)
            continue
        wsi = WholeSlide(slide_id, slide.source, slide.mpp)
        try:
            rgb, downsample = wsi.thumbnail(1024)
            width, height = wsi.dimensions
        finally:
            wsi.close()
        png = figures.slide_heatmap(rgb, downsample, cells.coords[sel], pct[sel],
                                    f"{pid} / {slide_id}: {method} score percentile", top=min(top_k, int(sel.sum())),
                                    ranked=ranked)
        (folder / f"heatmap_{slide_id}.png").write_bytes(png)
        what = "cells coloured by score percentile" if ranked else "cell positions (scores nearly uniform: not ranked)"
        heatmaps.append((f"slide {slide_id} ({width} × {height} px): {what}", png))
        doc = slide_geojson(cells.cell_ids[sel], cells.coords[sel], cells.bboxes[sel],
                            None if cells.cell_types is None else cells.cell_types[sel], s.scores[sel], pct[sel],
                            None if s.class_scores is None else s.class_scores[sel], classes)
        write_text(folder / f"{slide_id}.geojson", json.dumps(doc) + "\n")
    if crop_cells.any():
        idx = np.flatnonzero(crop_cells)
        thumbs = None if cells.thumbnails is None else cells.thumbnails[idx]
        png = figures.mosaic(thumbs, s.scores[idx], pct[idx], pid, ranked=ranked)
        (folder / "mosaic.png").write_bytes(png)
        heatmaps.append(("crop folder(s): cells ordered by score, framed by score percentile" if ranked else
                         "crop folder(s): the cells in bag order (scores nearly uniform: not ranked)", png))
        notes.append("crop-folder slides have no positions: a mosaic replaces the heatmap and no GeoJSON is written")
    return heatmaps, galleries, notes


def class_gallery_k(n_cells: int, n_classes: int, top_k: int) -> int:
    """Cells per class gallery: ``min(top_k, n_cells // n_classes)`` (at least 1), so that the
    classes' galleries could all be different cells; beyond that, any overlap is the model's."""
    return max(1, min(top_k, n_cells // max(n_classes, 1)))


def _class_galleries(pid: str, cells: PatientCells, class_scores: np.ndarray, classes: Sequence[str], top_k: int,
                     folder: Path, method: str) -> list[tuple[str, bytes]]:
    """One gallery per class of its highest cells, captioned with k and the cells other classes share."""
    k = class_gallery_k(cells.n_cells, len(classes), top_k)
    tops = [set(np.argsort(-class_scores[:, c], kind="stable")[:k].tolist()) for c in range(len(classes))]
    out = []
    for c, name in enumerate(classes):
        contrast = score_contrast(class_scores[:, c], method)
        png = figures.gallery(cells.thumbnails, class_scores[:, c], cells.cell_types, k, f"{pid}: class {name}",
                              bottom=False, ranked=contrast.singled_out)
        (folder / f"gallery_{name}.png").write_bytes(png)
        if not contrast.singled_out:
            out.append((f"class {name}: {contrast.text}; {k} cells in bag order instead of a ranking", png))
            continue
        shared = len(tops[c] & set().union(*(t for j, t in enumerate(tops) if j != c)))
        why = (f"k = min(--top-k {top_k}, {cells.n_cells} cells ÷ {len(classes)} classes) = {k}, so that the "
               "classes' galleries need not share cells")
        same = f"; {shared} of them also among another class's top {k}" if shared else ""
        out.append((f"top {k} cells for class {name} ({why}{same})", png))
    return out


def _field_figures(pid: str, slide_id: str, source: Path, mpp: float | None, cells: PatientCells, s: PatientScores,
                   pct: np.ndarray, classes: Sequence[str], top_k: int, folder: Path, method: str,
                   heatmaps: list[tuple[str, bytes]], notes: list[str], ranked: bool = True) -> None:
    """One heatmap and one GeoJSON per photographed field of a slide, in the field's pixels."""
    # Field names are text from the bag: only names found in the folder's listing become paths.
    on_disk = {path.name: path for path in list_fields(slide_id, source).paths} if source.is_dir() else {}
    in_slide = cells.slide_ids == slide_id
    for k, name in enumerate(cells.field_names[slide_id]):
        sel = in_slide & (cells.field == k)
        if name not in on_disk:
            notes.append(f"slide {slide_id}: field {name} is no longer in {source}; no heatmap drawn for it")
            continue
        image = FieldImage(slide_id, on_disk[name], mpp)
        try:
            rgb, downsample = image.thumbnail(1024)
            width, height = image.dimensions
        finally:
            image.close()
        png = figures.slide_heatmap(rgb, downsample, cells.coords[sel], pct[sel],
                                    f"{pid} / {slide_id} / {name}: {method} score percentile",
                                    top=min(top_k, int(sel.sum())), ranked=ranked)
        (folder / f"heatmap_{slide_id}_field{k}.png").write_bytes(png)
        heatmaps.append((f"slide {slide_id}, field {name} ({width} × {height} px, {int(sel.sum())} cells): "
                         + ("cells coloured by score percentile" if ranked else "scores nearly uniform: not ranked"),
                         png))
        doc = slide_geojson(cells.cell_ids[sel], cells.coords[sel], cells.bboxes[sel],
                            None if cells.cell_types is None else cells.cell_types[sel], s.scores[sel], pct[sel],
                            None if s.class_scores is None else s.class_scores[sel], classes)
        write_text(folder / f"{slide_id}_field{k}.geojson", json.dumps(doc) + "\n")
