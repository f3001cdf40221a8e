"""``milhema explain``: scores, figures, GeoJSON and an HTML report per patient, plus a cohort overview.

Output folder (written atomically)::

    <out>/summary.json            method, run, per-patient prediction, faithfulness (if bags carry truth)
    <out>/overview.png            PCA of all explained cells (score percentile, cell type)
    <out>/<patient_id>/cell_scores.csv, gallery.png, gallery_<class>.png, heatmap_<slide>.png (scans),
                      heatmap_<slide>_field<k>.png (one per photographed field, k = the bag's field index)
                      or mosaic.png (crops), <slide_id>.geojson / <slide_id>_field<k>.geojson, report.html
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import MilhemaError
from milhema.explain import figures
from milhema.explain.cells import PatientCells, patient_cells
from milhema.explain.geojson import slide_geojson
from milhema.explain.report import ReportContent, render_report
from milhema.explain.scores import PatientScores, explain_scores
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


def type_counts(cell_types: np.ndarray | None, scores: np.ndarray, top_k: int) -> list[tuple[str, int, int]]:
    """``(type, cells, cells among the top_k by score)`` per annotated cell type, most frequent first."""
    if cell_types is None or not len(cell_types):
        return []
    types = np.asarray(cell_types, object)
    top = set(np.argsort(-np.asarray(scores), kind="stable")[:top_k].tolist())
    names, counts = np.unique(types.astype(str), return_counts=True)
    rows = [(name or "(no type)", int(n), sum(1 for i in np.flatnonzero(types == name) if i in top))
            for name, n in zip(names, counts, strict=True)]
    return sorted(rows, key=lambda r: (-r[1], r[0]))


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
            folder = tmp / pid
            header, rows = cell_rows(cells, s, pct, classes)
            write_csv(folder / "cell_scores.csv", header, rows)
            heatmaps, galleries, notes = _figures(cohort, pid, cells, s, pct, classes, top_k, folder, method)
            notes_global += [f"{pid}: {n}" for n in notes]
            probs = s.probs
            patient = cohort.patients[pid]
            content = ReportContent(
                patient_id=pid, classes=classes, probs=probs, label=patient.label,
                cbc={c: float(patient.values.get(c, float("nan"))) for c in patient_features}, method=method,
                run=str(run), model=str(spec["model"]), fusion=str(spec["fusion"]), backbone=loaded.info.backbone,
                date=date, n_cells=cells.n_cells, n_models=s.n_models, heatmaps=heatmaps, galleries=galleries,
                notes=notes, cell_types=type_counts(cells.cell_types, s.scores, top_k), top_k=top_k)
            write_text(folder / "report.html", render_report(content))
            all_features.append(np.asarray(cells.features, np.float32))
            all_pct.append(pct)
            any_types = any_types or cells.cell_types is not None
            all_types.append(cells.cell_types if cells.cell_types is not None else np.full(cells.n_cells, "", object))
            truth[pid] = cells.diagnostic
            by_patient[pid] = {"label": patient.label, "pred": classes[int(np.argmax(probs))],
                               "probs": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
                               "n_cells": cells.n_cells, "n_models": s.n_models}
        if sum(len(f) for f in all_features):
            png = figures.overview(np.concatenate(all_features), np.concatenate(all_pct),
                                   np.concatenate(all_types) if any_types else None,
                                   f"{len(ids)} patients, {method} scores: PCA of cell features")
            (tmp / "overview.png").write_bytes(png)
        summary: dict[str, Any] = {"method": method, "run": str(run), "model": spec["model"], "fusion": spec["fusion"],
                                   "backbone": loaded.info.backbone, "classes": classes, "n_patients": len(ids),
                                   "date": date, "patients": by_patient, "notes": notes_global}
        if any(t is not None for t in truth.values()):
            summary["faithfulness"] = {"diagnostic_auroc": diagnostic_auroc(
                {p: scores[p].scores for p in ids}, truth), "method": method}
        write_text(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _figures(cohort: Cohort, pid: str, cells: PatientCells, s: PatientScores, pct: np.ndarray,
             classes: Sequence[str], top_k: int, folder: Path,
             method: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[str]]:
    """Write the patient's PNGs and GeoJSON; return (heatmaps, galleries, notes) for the report."""
    heatmaps: list[tuple[str, bytes]] = []
    galleries: list[tuple[str, bytes]] = []
    notes: list[str] = []
    if cells.n_cells == 0:
        return heatmaps, galleries, ["no cells in this patient's bags"]
    if cells.thumbnails is None:
        notes.append("the bags hold no thumbnails: galleries show grey tiles")
    png = figures.gallery(cells.thumbnails, s.scores, cells.cell_types, top_k, f"{pid} ({method})")
    (folder / "gallery.png").write_bytes(png)
    galleries.append((f"top and bottom {min(top_k, cells.n_cells)} cells by {method} score", png))
    if s.class_scores is not None:
        for k, name in enumerate(classes):
            png = figures.gallery(cells.thumbnails, s.class_scores[:, k], cells.cell_types, top_k,
                                  f"{pid}: class {name}", bottom=False)
            (folder / f"gallery_{name}.png").write_bytes(png)
            galleries.append((f"top {min(top_k, cells.n_cells)} cells for class {name}", png))
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
                           heatmaps, notes)
            continue
        wsi = WholeSlide(slide_id, slide.source, slide.mpp)
        try:
            rgb, downsample = wsi.thumbnail(1024)
            width, height = wsi.dimensions
        finally:
            wsi.close()
        png = figures.slide_heatmap(rgb, downsample, cells.coords[sel], pct[sel],
                                    f"{pid} / {slide_id}: {method} score percentile", top=min(top_k, int(sel.sum())))
        (folder / f"heatmap_{slide_id}.png").write_bytes(png)
        heatmaps.append((f"slide {slide_id} ({width} × {height} px): cells coloured by score percentile", png))
        doc = slide_geojson(cells.cell_ids[sel], cells.coords[sel], cells.bboxes[sel],
                            None if cells.cell_types is None else cells.cell_types[sel], s.scores[sel], pct[sel],
                            None if s.class_scores is None else s.class_scores[sel], classes)
        write_text(folder / f"{slide_id}.geojson", json.dumps(doc) + "\n")
    if crop_cells.any():
        idx = np.flatnonzero(crop_cells)
        thumbs = None if cells.thumbnails is None else cells.thumbnails[idx]
        png = figures.mosaic(thumbs, s.scores[idx], pct[idx], pid)
        (folder / "mosaic.png").write_bytes(png)
        heatmaps.append(("crop folder(s): cells ordered by score, framed by score percentile", png))
        notes.append("crop-folder slides have no positions: a mosaic replaces the heatmap and no GeoJSON is written")
    return heatmaps, galleries, notes


def _field_figures(pid: str, slide_id: str, source: Path, mpp: float | None, cells: PatientCells, s: PatientScores,
                   pct: np.ndarray, classes: Sequence[str], top_k: int, folder: Path, method: str,
                   heatmaps: list[tuple[str, bytes]], notes: list[str]) -> None:
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
                                    top=min(top_k, int(sel.sum())))
        (folder / f"heatmap_{slide_id}_field{k}.png").write_bytes(png)
        heatmaps.append((f"slide {slide_id}, field {name} ({width} × {height} px, {int(sel.sum())} cells): "
                         "cells coloured by score percentile", png))
        doc = slide_geojson(cells.cell_ids[sel], cells.coords[sel], cells.bboxes[sel],
                            None if cells.cell_types is None else cells.cell_types[sel], s.scores[sel], pct[sel],
                            None if s.class_scores is None else s.class_scores[sel], classes)
        write_text(folder / f"{slide_id}_field{k}.geojson", json.dumps(doc) + "\n")
