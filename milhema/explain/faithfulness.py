"""Faithfulness of cell scores: do the highest-scored cells coincide with the diagnostic cells?"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import roc_auc_score


def diagnostic_auroc(scores_per_patient: Mapping[str, np.ndarray],
                     diagnostic_per_patient: Mapping[str, np.ndarray | None]) -> dict[str, float | int | None]:
    """Per-patient AUROC of cell scores against the per-cell ``diagnostic`` truth.

    Args:
        scores_per_patient: patient id -> ``[N]`` cell scores (any scale; higher = more important).
        diagnostic_per_patient: patient id -> ``[N]`` bool truth, or None when unknown.

    Returns:
        ``{"mean", "median", "n_patients"}`` over the patients that have both diagnostic and
        non-diagnostic cells (AUROC is undefined otherwise); mean and median are None when no
        patient qualifies.
    """
    values = []
    for pid, scores in scores_per_patient.items():
        truth = diagnostic_per_patient.get(pid)
        if truth is None:
            continue
        truth = np.asarray(truth, bool)
        scores = np.asarray(scores, float)
        if len(truth) != len(scores) or truth.all() or not truth.any():
            continue
        values.append(float(roc_auc_score(truth, scores)))
    if not values:
        return {"mean": None, "median": None, "n_patients": 0}
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "n_patients": len(values)}
