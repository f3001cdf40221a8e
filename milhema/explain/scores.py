"""Per-cell scores of a run's model(s) for a patient: attention, or occlusion (model-agnostic).

Both use the same models as ``milhema predict``: for a cv run, a patient the run tested is
scored by the fold model(s) that held it out (averaged over repeats), any other patient by all
fold models. Scores are ``[N]`` over the cells of the patient's :class:`PatientBag` (all slides
concatenated in slides.csv order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from milhema.errors import MilhemaError
from milhema.train.inference import occlusion
from milhema.train.predict import LoadedRun, predict_run

METHODS = ("attention", "occlusion")


@dataclass
class PatientScores:
    """Scores of one patient.

    Attributes:
        probs: ``[K]`` predicted class probabilities (mean over the patient's models).
        scores: ``[N]`` cell scores. Attention: >= 0, sum 1. Occlusion: drop of the predicted
            class's probability when the cell is removed (positive = the cell supports it).
        class_scores: ``[N, K]`` per-class scores or None (attention of class branches; for
            occlusion the drop of each class's probability).
        n_models: how many models were averaged.
    """

    probs: np.ndarray
    scores: np.ndarray
    class_scores: np.ndarray | None
    n_models: int


def explain_scores(loaded: LoadedRun, patient_ids: Sequence[str], device: torch.device, method: str = "attention",
                   chunk: int = 64, progress: bool = False) -> dict[str, PatientScores]:
    """Scores of every patient in ``patient_ids`` by ``method`` (see :data:`METHODS`)."""
    if method not in METHODS:
        raise MilhemaError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    base = predict_run(loaded, patient_ids, device)
    if method == "attention":
        return {p: PatientScores(base.probs[p], base.cell_scores[p], base.class_cell_scores[p], base.counts[p])
                for p in patient_ids}
    sums: dict[str, np.ndarray] = {}
    for (model, _), assigned in zip(loaded.models, loaded.assignments(patient_ids), strict=True):
        model.eval().to(device)
        for pid in assigned:
            drop = occlusion(model, loaded.store.get(pid), device, chunk)
            sums[pid] = sums[pid] + drop if pid in sums else drop
    out = {}
    for pid in patient_ids:
        per_class = sums[pid] / base.counts[pid]
        target = int(np.argmax(base.probs[pid]))
        out[pid] = PatientScores(base.probs[pid], per_class[:, target].copy(), per_class, base.counts[pid])
    return out
