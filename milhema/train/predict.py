"""``milhema predict``: predictions and per-cell scores of a train or cv run for a cohort.

For a cv run, a patient that was in a test fold of the run is predicted by the model(s) that
did not train on it (its out-of-fold prediction, averaged over repeats); any other patient by
the ensemble of all fold models. A train run has one model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from milhema.config import settings_from_mapping
from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.differential import (
    ANOMALY_HEADER,
    DIFFERENTIAL_HEADER,
    SlidePredictions,
    differential_rows,
    read_slide_predictions,
    with_differential,
)
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, check_new_folder, write_csv, write_text
from milhema.settings import Settings
from milhema.train.baseline import BASELINE_FILE, cbc_baseline_proba, cbc_design
from milhema.train.calibration import coverage_curve
from milhema.train.checkpoint import CheckpointError, check_compatible, load_checkpoint
from milhema.train.data import BagInfo, BagStore, PatientBag, check_views, inspect_bags
from milhema.train.figures import classification_figure
from milhema.train.inference import predict_patients
from milhema.train.metrics import classification_metrics
from milhema.train.model import PatientModel, check_inputs
from milhema.train.outputs import prediction_header, prediction_rows, write_cell_scores

# Written by cv: the signature of each patient's data, so predict knows a patient of the run from
# another cohort's patient who happens to have the same id.
SIGNATURES_FILE = "run_patients.json"


def patient_signature(bag: PatientBag) -> str:
    """What identifies a patient's data beyond its id: SHA-256 of its slide ids, cell ids and features."""
    digest = hashlib.sha256("\n".join(bag.slide_ids).encode())
    digest.update("\n".join(map(str, bag.cell_ids)).encode())
    digest.update(np.ascontiguousarray(bag.features).tobytes())
    return digest.hexdigest()[:32]


def run_settings(run: str | Path) -> Settings:
    """The resolved settings a run was trained with (its ``config.yaml``; keys it lacks take today's defaults)."""
    run = Path(run)
    path = run / "config.yaml"
    if not path.is_file():
        raise MilhemaError(f"{run} is not a milhema run folder (no config.yaml); pass the --out of train or cv")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MilhemaError(f"{path}: cannot be read as the run's config ({type(exc).__name__}); "
                           "restore it from the run, or train again") from exc
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise MilhemaError(f"{path}: not a milhema run config (no 'data' section); restore it, or train again")
    return settings_from_mapping(config, f"run config {path}")


@dataclass
class LoadedRun:
    """The checkpoints of a run, checked against a bag folder, with a store of the cohort's bags.

    ``models`` holds one ``(model, checkpoint meta)`` per checkpoint file (one for a train run,
    one per fold and repeat for a cv run).
    """

    run: Path
    settings: Settings
    models: list[tuple[PatientModel, dict[str, Any]]]
    classes: list[str]
    store: BagStore
    info: BagInfo
    signatures: dict[str, str] | None = None

    def assignments(self, patient_ids: Sequence[str], ensemble: bool = False) -> list[list[str]]:
        """For each model, the patients it predicts (out-of-fold unless ``ensemble``).

        A patient counts as one the run tested only if its id *and* its slides and cell count match
        the run's record: another hospital's "P001" is a new patient, predicted by every model.
        """
        tested: set[str] = set()
        for _, meta in self.models:
            tested |= {p for p in meta.get("test_patients", []) if self._same_patient(p)}
        out = []
        for _, meta in self.models:
            own = set(meta.get("test_patients", []))
            # Out-of-fold: a patient the run tested goes only to the models that held it out.
            out.append([p for p in patient_ids if ensemble or p not in tested or p in own])
        return out

    def _same_patient(self, patient_id: str) -> bool:
        if self.signatures is None:   # runs before signatures: ids alone
            return True
        if patient_id not in self.signatures or patient_id not in self.store.cohort.patients:
            return False
        return self.signatures[patient_id] == patient_signature(self.store.get(patient_id))


@dataclass
class RunPrediction:
    """Per-patient outputs of a run, averaged over the models assigned to each patient.

    ``cell_scores[p]`` is ``[n_p]`` in the order of the patient's :class:`PatientBag`;
    ``class_cell_scores[p]`` is ``[n_p, K]`` or None; ``counts[p]`` is the number of models.
    """

    probs: dict[str, np.ndarray]
    counts: dict[str, int]
    cell_scores: dict[str, np.ndarray]
    class_cell_scores: dict[str, np.ndarray | None]
    slide_probs: dict[str, np.ndarray]
    slide_patient: dict[str, str]
    risk: dict[str, float] | None = None   # survival runs: mean risk of the patient's models


def load_run(run: str | Path, cohort: Cohort, bags: str | Path | None, patient_ids: Sequence[str]) -> LoadedRun:
    """Load every checkpoint of ``run`` and check it fits the bags of ``patient_ids``."""
    run = Path(run)
    bags = None if bags is None else Path(bags)
    stems = sorted(p.with_suffix("") for p in (run / "checkpoints").glob("*.json"))
    if not stems:
        raise CheckpointError(f"{run}/checkpoints holds no checkpoint")
    settings = run_settings(run)
    info = inspect_bags(cohort, bags, patient_ids, settings.data.feature_blocks)
    cohort, cell_classifier = with_differential(cohort, bags, patient_ids)
    models = [load_checkpoint(stem) for stem in stems]
    for (_, meta), stem in zip(models, stems, strict=True):
        check_compatible(meta, info, f"{run.name}/checkpoints/{stem.name}")
        _same_cell_classifier(meta, cell_classifier, f"{run.name}/checkpoints/{stem.name}")
    classes = models[0][1]["spec"]["classes"]
    for _, meta in models:
        check_inputs(meta["spec"], info, patient_ids)
    if "n_views" in models[0][1]["spec"]["params"]:
        check_views(cohort, patient_ids, models[0][1]["spec"]["views"])
    store = BagStore(cohort, bags, models[0][1]["spec"]["views"], cache=True, columns=info.columns,
                     feature_dim=info.feature_dim, n_cells=info.n_cells, checked=True)
    signatures_file = run / SIGNATURES_FILE
    signatures = None
    if signatures_file.is_file():
        try:
            signatures = dict(json.loads(signatures_file.read_text(encoding="utf-8"))["signatures"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MilhemaError(f"{signatures_file}: unreadable ({type(exc).__name__}); restore it from the run, "
                               "or pass --ensemble") from exc
    return LoadedRun(run, settings, models, classes, store, info, signatures)


def _same_cell_classifier(meta: Mapping[str, Any], found: str | None, where: str) -> None:
    """Refuse a predicted differential from another cell classifier than the one the model was trained on."""
    trained = meta["bags"].get("cell_classifier_sha256")
    if trained and found and trained != found:
        raise CheckpointError(f"the model in {where} read the differential of cell classifier {trained[:12]} but these "
                              f"bags were predicted by {found[:12]}; run milhema cells predict with the same cells run")


def predict_run(loaded: LoadedRun, patient_ids: Sequence[str], device: torch.device,
                ensemble: bool = False) -> RunPrediction:
    """Probabilities and cell scores of ``patient_ids`` (out-of-fold for a cv run's own patients)."""
    t = loaded.settings.train
    k = len(loaded.classes)
    totals = {p: np.zeros(k) for p in patient_ids}
    counts = dict.fromkeys(patient_ids, 0)
    slide_sum: dict[str, np.ndarray] = {}
    slide_patient: dict[str, str] = {}
    cell_sum: dict[str, list[Any]] = {}
    risk_sum: dict[str, float] = {}
    for (model, _), assigned in zip(loaded.models, loaded.assignments(patient_ids, ensemble), strict=True):
        if not assigned:
            continue
        result = predict_patients(model, loaded.store.many(assigned), t.batch_size, device)
        for j, pid in enumerate(result.patient_ids):
            totals[pid] += result.patient.probs[j]
            counts[pid] += 1
            if model.survival is not None and result.patient.risk is not None:
                risk_sum[pid] = risk_sum.get(pid, 0.0) + float(result.patient.risk[j])
            scores = result.patient.cell_scores[j]
            per_class = result.patient.class_cell_scores[j]
            if pid in cell_sum:
                cell_sum[pid][0] = cell_sum[pid][0] + scores
                cell_sum[pid][1] = None if per_class is None else cell_sum[pid][1] + per_class
            else:
                cell_sum[pid] = [scores, per_class]
        for j, sid in enumerate(result.slide_ids):
            slide_sum[sid] = slide_sum.get(sid, 0) + result.slide.probs[j]
            slide_patient[sid] = result.slide_patient[j]
    probs = {p: totals[p] / max(counts[p], 1) for p in patient_ids}
    cells = {p: cell_sum[p][0] / counts[p] for p in cell_sum}
    class_cells = {p: None if cell_sum[p][1] is None else cell_sum[p][1] / counts[p] for p in cell_sum}
    slides = {s: slide_sum[s] / counts[slide_patient[s]] for s in slide_sum}
    risk = {p: risk_sum[p] / counts[p] for p in risk_sum} if risk_sum else None
    return RunPrediction(probs, counts, cells, class_cells, slides, slide_patient, risk)


def run_predict(run: str | Path, cohort: Cohort, bags: str | Path | None, out: str | Path, *, ensemble: bool = False,
                overwrite: bool = False, device: str = "auto") -> dict[str, Any]:
    """Write predictions.csv, slide_predictions.csv and cell_scores/ into ``out`` (and, for patients with
    a label, metrics.json and classification.png: an external validation); return patient ids,
    probabilities and those metrics (None without labels)."""
    out = Path(out)
    check_new_folder(out, overwrite=overwrite, what="output folder")
    ids = cohort.patient_ids
    loaded = load_run(run, cohort, bags, ids)
    classes, store = loaded.classes, loaded.store
    cohort = store.cohort   # with the patient features computed from the bags
    bags = None if bags is None else Path(bags)
    differential = read_slide_predictions(cohort, bags, ids, required=False)
    result = predict_run(loaded, ids, resolve_device(device), ensemble)
    counts = result.counts
    probs = np.array([result.probs[p] for p in ids])
    with atomic_folder(out, overwrite=overwrite, what="output folder") as tmp:
        labels = [cohort.patients[p].label for p in ids]
        risk = result.risk
        # Risk is on each model's own scale: compare patients scored by the same model(s).
        # confidence: the calibrated probability of the predicted class; the run's coverage curve
        # (metrics.json) says how accurate the model is above a confidence.
        write_csv(tmp / "predictions.csv", prediction_header("patient_id", classes,
                                                             ["confidence", "n_models", *(["risk"] if risk else [])]),
                  prediction_rows(ids, labels, probs, classes,
                                  [(f"{probs[i].max():.6f}", counts[p], *((f"{risk[p]:.6f}",) if risk and p in risk else ()))
                                   for i, p in enumerate(ids)]))
        sids = list(result.slide_probs)
        write_csv(tmp / "slide_predictions.csv", prediction_header("slide_id", classes, ["patient_id"]),
                  prediction_rows(sids, [cohort.patients[result.slide_patient[s]].label for s in sids],
                                  np.array([result.slide_probs[s] for s in sids]).reshape(len(sids), -1),
                                  classes, [(result.slide_patient[s],) for s in sids]))
        for pid in ids:
            write_cell_scores(tmp / "cell_scores", store.get(pid), result.cell_scores[pid],
                              result.class_cell_scores[pid], classes)
        if differential:
            write_differential(tmp, differential, cohort)
        metrics = validation_metrics(loaded, cohort, ids, probs, result.counts, ensemble)
        if metrics is not None:
            write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            labelled = [i for i, p in enumerate(ids) if cohort.patients[p].label is not None]
            classification_figure(cohort.labels([ids[i] for i in labelled]), probs[labelled], classes,
                                  tmp / "classification.png", f"{len(labelled)} labelled patients, run {loaded.run.name}")
    return {"patient_ids": np.array(ids, dtype=object), "probs": probs, "metrics": metrics}


def write_differential(folder: Path, found: Mapping[str, list[SlidePredictions]], cohort: Cohort) -> None:
    """differential.csv (and anomalies.csv when the classifier has an anomaly head): the predicted
    differential per patient and slide with 95 % intervals (:mod:`milhema.differential`)."""
    diff, anomalies = differential_rows(dict(found), cohort)
    write_csv(folder / "differential.csv", list(DIFFERENTIAL_HEADER), diff)
    if anomalies:
        write_csv(folder / "anomalies.csv", list(ANOMALY_HEADER), anomalies)


def validation_metrics(loaded: LoadedRun, cohort: Cohort, ids: Sequence[str], probs: np.ndarray,
                       counts: Mapping[str, int], ensemble: bool) -> dict[str, Any] | None:
    """Metrics of the predictions of ``ids`` that carry a label (an external validation when the
    cohort is new), beside the run's CBC-only model applied to the same patients; None without labels."""
    labelled = [i for i, p in enumerate(ids) if cohort.patients[p].label is not None]
    if not labelled:
        return None
    classes = loaded.classes
    y = cohort.labels([ids[i] for i in labelled])
    p = probs[labelled]
    metrics: dict[str, Any] = {
        "task": "classification", "classes": classes, "run": str(loaded.run), "n_patients": len(labelled),
        "models": "the fold models that held each run patient out; all fold models for new patients"
        if not ensemble else "every model of the run for every patient",
        "out_of_fold_patients": sum(1 for i in labelled if counts[ids[i]] < len(loaded.models)),
        "patient": classification_metrics(y, p, classes),
        "coverage": coverage_curve(y, p, len(classes)),
        "baselines": {},
    }
    baseline = loaded.run / BASELINE_FILE
    if metrics["out_of_fold_patients"]:
        # The CBC-only model was fitted on every patient of the run: on them it would be scored in sample
        # beside out-of-fold predictions. cv's metrics.json holds its out-of-fold baseline.
        metrics["baselines_note"] = (f"no CBC-only baseline: it was fitted on the {metrics['out_of_fold_patients']} "
                                     "run patients among these; the run's metrics.json has its out-of-fold baseline")
    elif baseline.is_file():
        params = json.loads(baseline.read_text(encoding="utf-8"))
        x = cbc_design(cohort, [ids[i] for i in labelled], params["log_columns"])
        order = [cohort.patient_features.index(c) for c in params["columns"]]
        metrics["baselines"]["cbc_only"] = {
            "patient": classification_metrics(y, cbc_baseline_proba(params, x[:, order]), classes),
            "fitted_on": "every labelled patient of the run"}
    return metrics
