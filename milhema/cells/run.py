"""``milhema cells train``: a cell classifier cross-validated over patients, in an atomic run folder.

The annotated patients are split into ``cells.folds`` patient-grouped folds (types stratified as
whole patients allow). Each fold trains a model on the other folds' patients (early-stopped and
calibrated on a patient-grouped validation share of them) and predicts its own patients' cells:
every metric is out of fold, on patients the model never saw. The K fold models are the
classifier: ``cells predict`` gives a run patient's slides the model that held the patient out,
and any other slide the mean of all K (as ``milhema predict`` does with a cv run).

Why cross-validation rather than one test split: annotated patients are few (tens), a single
split would score a handful of them, and the fold models are needed anyway to predict the
training patients' own cells without leaking their annotations into their differential.

Run folder::

    config.yaml              the resolved config (its cells section made the classifier)
    classifier.json          types, attributes, neutrophil types, folds and files, fingerprint, bags' backbone
    classifier/fold<k>.safetensors + .json   each fold model (weights; spec, calibration, patients, slides)
    metrics.json             out-of-fold metrics (types, attributes, differential) and the annotation report
    confusion.png            the confusion matrix, out of fold
    cell_predictions.csv     every annotated cell: fold, annotated and predicted type, probabilities
    history.jsonl            one line per fold and epoch
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from milhema.cells.annotations import AnnotatedCells, gather, read_labels
from milhema.cells.fit import fit_classifier, grouped_folds, validation_split, without_patients
from milhema.cells.metrics import attribute_metrics, confusion_figure, differential_error, type_metrics
from milhema.cells.model import (
    CLASSIFIER_DIR,
    CLASSIFIER_FILE,
    RUN_FORMAT,
    CellClassifier,
    decide,
    save_classifier,
)
from milhema.config import dump_config
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, check_new_folder, write_csv, write_text
from milhema.settings import Settings
from milhema.train.metrics import expected_calibration_error


def run_fingerprint(weights_sha256: list[str]) -> str:
    """The classifier's fingerprint: SHA-256 of its fold models' weight hashes, in fold order."""
    return hashlib.sha256("\n".join(weights_sha256).encode()).hexdigest()


class OutOfFold:
    """Out-of-fold predictions of every annotated cell, filled fold by fold (rows of :class:`AnnotatedCells`)."""

    def __init__(self, cells: AnnotatedCells) -> None:
        m, t, a = len(cells), len(cells.types), len(cells.attribute_names)
        self.types = np.zeros((m, t))
        self.raw_types = np.zeros((m, t))
        self.attributes = np.zeros((m, a))
        self.pred = np.zeros(m, np.int64)      # the predicted type (:func:`decide`)
        self.fold = np.full(m, -1, np.int64)
        self.folds: list[dict[str, Any]] = []

    def add(self, k: int, rows: np.ndarray, model: CellClassifier, features: np.ndarray) -> None:
        types, attributes = model.probabilities(features)
        self.types[rows], self.fold[rows] = types, k
        self.pred[rows] = decide(types, model.type_prior.numpy())
        self.raw_types[rows] = model.probabilities(features, calibrated=False)[0]
        if attributes is not None:
            self.attributes[rows] = attributes


def run_cells_train(settings: Settings, cohort: Cohort, bags: str | Path | None, out: str | Path, *,
                    labels: Sequence[str | Path] = (), overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and cross-validate the cell classifier of ``settings.cells`` on the annotated cells of the
    cohort's bags; write the run folder ``out`` and return its metrics.

    ``labels`` are labels files (the filled CSV of ``milhema cells propose``): their non-empty labels
    add to the bags' annotations or replace them (:func:`milhema.cells.annotations.read_labels`).

    Raises:
        MilhemaError: ``out`` exists, no annotated cells, fewer than two types or patients than folds,
            a label naming a cell that is not in the bags.
    """
    out, started = Path(out), time.perf_counter()
    bags = None if bags is None else Path(bags)
    check_new_folder(out, overwrite=overwrite, what="run folder")
    cells = gather(cohort, bags, settings.cells, labels=read_labels([Path(p) for p in labels]) if labels else None)
    learnt = [t for t, n in cells.report.per_type.items() if n > 0]
    if len(learnt) < 2:
        raise MilhemaError(f"annotated cells of at least two cell types are needed; found only {', '.join(learnt)} "
                           f"({cells.report.annotated} cells)")
    cs = settings.cells
    folds = grouped_folds(cells.y, cells.patients, cs.folds, cs.seed)
    device = resolve_device(cs.device)
    oof = OutOfFold(cells)
    with atomic_folder(out, overwrite=overwrite, what="run folder") as tmp:
        write_text(tmp / "config.yaml", dump_config(settings))
        bar = tqdm(total=len(folds), desc="cells train", unit="fold", disable=None if progress else True)
        for k, (train_rows, test_rows) in enumerate(folds):
            _train_fold(cells, settings, k, train_rows, test_rows, device, tmp, oof)
            bar.update(1)
        bar.close()
        fingerprint = run_fingerprint([f["weights_sha256"] for f in oof.folds])
        write_text(tmp / CLASSIFIER_FILE, json.dumps({
            "format": RUN_FORMAT, "format_version": 1, "fingerprint": fingerprint, "types": list(cells.types),
            "attributes": list(cells.attribute_names), "neutrophil_types": list(cs.neutrophils), "head": cs.head,
            "source": cells.source.as_dict(), "folds": oof.folds}, indent=2) + "\n")
        metrics = _metrics(cells, oof, settings, fingerprint, started)
        write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        confusion_figure(np.array(metrics["type_metrics"]["confusion_matrix"]["counts"]), cells.types, tmp / "confusion.png",
                         f"{cs.head} on {cells.source.backbone} features, out of fold "
                         f"({metrics['n_patients']} patients, {len(cells)} cells)")
        _write_cells(tmp / "cell_predictions.csv", cells, oof)
    return metrics


def _fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def _history(path: Path, fold: int) -> Callable[[dict[str, Any]], None]:
    def log(record: dict[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"fold": fold, **record}) + "\n")
    return log


def _train_fold(cells: AnnotatedCells, settings: Settings, k: int, train_rows: np.ndarray, test_rows: np.ndarray,
                device: torch.device, folder: Path, oof: OutOfFold) -> None:
    """Fit fold ``k``'s model, save it, and predict its held-out patients' cells into ``oof``."""
    cs = settings.cells
    inner, val = validation_split(cells, train_rows, cs.val_fraction, _fold_seed(cs.seed, k))
    model, history = fit_classifier(cells, inner, val, cs, device, _fold_seed(cs.seed, k),
                                    _history(folder / "history.jsonl", k))
    test_patients = list(dict.fromkeys(cells.patients[test_rows].tolist()))
    held_out = set(test_patients)
    meta = {"fold": k, "source": cells.source.as_dict(), "epochs_run": len(history),
            "temperature": float(model.temperature),
            "test_patients": test_patients,
            "train_patients": list(dict.fromkeys(cells.patients[inner].tolist())),
            "val_patients": list(dict.fromkeys(cells.patients[val].tolist())),
            # The slides of the held-out patients as they were: cells predict gives them this model only
            # when the bag it is given holds the same cells and features.
            "test_slides": {s: sig for s, sig in cells.signatures.items() if _patient_of(cells, s) in held_out}}
    stem = folder / CLASSIFIER_DIR / f"fold{k}"
    sha = save_classifier(stem, model, meta)
    oof.folds.append({"fold": k, "file": f"{CLASSIFIER_DIR}/fold{k}", "weights_sha256": sha,
                      "epochs_run": len(history), "test_patients": len(test_patients),
                      "temperature": float(model.temperature)})
    oof.add(k, test_rows, model, cells.features[test_rows])


def _patient_of(cells: AnnotatedCells, slide_id: str) -> str | None:
    rows = np.flatnonzero(cells.slides == slide_id)
    return str(cells.patients[rows[0]]) if len(rows) else None


_EVALUATION = {
    False: "out of fold: each patient's cells predicted by the fold model that never saw the patient "
           "(patient-grouped K-fold, types stratified as whole patients allow); intervals resample patients",
    True: "out of fold, by cell: the annotated cells come from one patient or a collection without patients, "
          "so folds are stratified by type over cells (cells of one smear may be on both sides: optimistic for new "
          "patients); intervals resample cells",
}


def _metrics(cells: AnnotatedCells, oof: OutOfFold, settings: Settings, fingerprint: str,
             started: float) -> dict[str, Any]:
    cs = settings.cells
    metrics: dict[str, Any] = {
        "task": "cell types", "types": list(cells.types), "attribute_names": list(cells.attribute_names),
        "head": cs.head, "folds": cs.folds,
        "evaluation": _EVALUATION[without_patients(cells)],
        "n_patients": len(cells.patient_ids), "n_cells": len(cells), "n_slides": len(set(cells.slides.tolist())),
        "backbone": cells.source.backbone, "feature_dim": cells.source.feature_dim,
        "classifier_sha256": fingerprint, "annotations": cells.report.as_dict(cs),
    }
    # Without patients, intervals resample cells (each its own group).
    groups = np.arange(len(cells)).astype(str) if without_patients(cells) else cells.patients
    metrics["type_metrics"] = type_metrics(cells.y, oof.types, oof.pred, cells.types, groups, seed=cs.seed)
    metrics["type_metrics"]["decision"] = ("argmax of p[t] / training frequency of t: the most likely type under "
                                           "equal frequencies (maximises balanced accuracy)")
    metrics["calibration"] = {
        "method": "prior correction of the class weights, temperature scaling and per-type biases fitted on each "
                  "fold's validation patients",
        "ece": {"before": expected_calibration_error(cells.y, oof.raw_types),
                "after": metrics["type_metrics"]["ece"]},
        "temperature": [round(f["temperature"], 4) for f in oof.folds]}
    if cells.attribute_names:
        metrics["attribute_metrics"] = attribute_metrics(cells.attributes, oof.attributes, cells.attribute_names,
                                                  cells.patients, seed=cs.seed)
        metrics["attribute_loss"] = {"name": cs.attribute_loss, "gamma_neg": cs.gamma_neg, "gamma_pos": cs.gamma_pos,
                                     "clip": cs.clip, "calibration": "Platt scaling per attribute on validation"}
    metrics["differential"] = differential_error(cells.y, oof.types, cells.types, cells.patients)
    metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    return metrics


def _write_cells(path: Path, cells: AnnotatedCells, oof: OutOfFold) -> None:
    types = cells.types
    header = ["patient_id", "slide_id", "cell_id", "fold", "annotated", "predicted", "confidence",
              *(f"prob_{t}" for t in types), *(f"attr_{a}" for a in cells.attribute_names)]
    pred = oof.pred
    rows = [[cells.patients[i], cells.slides[i], cells.cell_ids[i], int(oof.fold[i]), types[cells.y[i]],
             types[pred[i]], f"{oof.types[i].max():.4f}", *(f"{p:.4f}" for p in oof.types[i]),
             *(f"{p:.4f}" for p in oof.attributes[i])] for i in range(len(cells))]
    write_csv(path, header, rows)
