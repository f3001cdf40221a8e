"""``milhema predict``: predictions and per-cell scores of a train or cv run for a cohort.

For a cv run, a patient that was in a test fold of the run is predicted by the model(s) that
did not train on it (its out-of-fold prediction, averaged over repeats); any other patient by
the ensemble of all fold models. A train run has one model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from milhema.data.manifest import Cohort
from milhema.device import resolve_device
from milhema.errors import MilhemaError
from milhema.io import atomic_folder, write_csv
from milhema.train.checkpoint import CheckpointError, check_compatible, load_checkpoint
from milhema.train.data import BagStore, inspect_bags
from milhema.train.outputs import prediction_header, prediction_rows, write_cell_scores
from milhema.train.run import predict_patients


def run_config(run: Path) -> dict[str, Any]:
    """The resolved config a run was trained with."""
    path = run / "config.yaml"
    if not path.is_file():
        raise MilhemaError(f"{run} is not a milhema run folder (no config.yaml); pass the --out of train or cv")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run_predict(run: str | Path, cohort: Cohort, bags: str | Path, out: str | Path, *, ensemble: bool = False,
                overwrite: bool = False, device: str = "auto") -> dict[str, np.ndarray]:
    """Write predictions.csv, slide_predictions.csv and cell_scores/ into ``out``; return patient probabilities."""
    run, bags, out = Path(run), Path(bags), Path(out)
    stems = sorted(p.with_suffix("") for p in (run / "checkpoints").glob("*.json"))
    if not stems:
        raise CheckpointError(f"{run}/checkpoints holds no checkpoint")
    config = run_config(run)
    ids = cohort.patient_ids
    info = inspect_bags(cohort, bags, ids, config["data"].get("feature_blocks"))
    models = [load_checkpoint(stem) for stem in stems]
    for (_, meta), stem in zip(models, stems, strict=True):
        check_compatible(meta, info, f"{run.name}/checkpoints/{stem.name}")
    classes = models[0][1]["spec"]["classes"]
    store = BagStore(cohort, bags, models[0][1]["spec"]["views"], cache=True, columns=info.columns)
    dev = resolve_device(device)
    batch_size = int(config["train"]["batch_size"])
    totals = {p: np.zeros(len(classes)) for p in ids}
    counts = dict.fromkeys(ids, 0)
    slide_sum: dict[str, np.ndarray] = {}
    slide_patient: dict[str, str] = {}
    cell_sum: dict[str, list[Any]] = {}
    tested = {p for _, meta in models for p in meta.get("test_patients", [])}
    for model, meta in models:
        own = set(meta.get("test_patients", []))
        # Out-of-fold: a patient the run tested goes only to the models that held it out.
        assigned = [p for p in ids if ensemble or p not in tested or p in own]
        if not assigned:
            continue
        result = predict_patients(model, store.many(assigned), batch_size, dev, bool(config["train"]["amp"]))
        for j, pid in enumerate(result.patient_ids):
            totals[pid] += result.patient.probs[j]
            counts[pid] += 1
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
    probs = np.array([totals[p] / max(counts[p], 1) for p in ids])
    slide_counts = {sid: counts[slide_patient[sid]] for sid in slide_sum}
    with atomic_folder(out, overwrite=overwrite, what="output folder") as tmp:
        labels = [cohort.patients[p].label for p in ids]
        write_csv(tmp / "predictions.csv", prediction_header("patient_id", classes, ["n_models"]),
                  prediction_rows(ids, labels, probs, classes, [(counts[p],) for p in ids]))
        sids = list(slide_sum)
        write_csv(tmp / "slide_predictions.csv", prediction_header("slide_id", classes, ["patient_id"]),
                  prediction_rows(sids, [cohort.patients[slide_patient[s]].label for s in sids],
                                  np.array([slide_sum[s] / slide_counts[s] for s in sids]).reshape(len(sids), -1),
                                  classes, [(slide_patient[s],) for s in sids]))
        for pid in ids:
            scores, per_class = cell_sum[pid]
            n = counts[pid]
            write_cell_scores(tmp / "cell_scores", store.get(pid), scores / n,
                              None if per_class is None else per_class / n, classes)
    return {"patient_ids": np.array(ids, dtype=object), "probs": probs}

