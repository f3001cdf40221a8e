"""Probabilities a clinician can act on: temperature scaling, and when to abstain.

Temperature scaling (Guo et al. 2017) divides a model's logits by one number T fitted on the
inner validation split of its training patients (never on test patients); T > 1 softens an
over-confident model. It keeps each patient's predicted class. The coverage curve says how
accurate the model is on the patients it is most confident about: a hospital can let it
report only above a confidence and send the others to a hematologist.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from milhema.train.metrics import balanced_accuracy  # the reported metrics' definitions

# Below 0.05 or above 20 a temperature says the validation split was too small to fit one.
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``[P, K]`` probabilities with their logits divided by ``temperature``."""
    logits = np.log(np.clip(np.asarray(probs, float), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of ``probs [P, K]`` against ``y [P]`` (-1 = no label).

    Returns 1.0 (no change) when fewer than two labelled patients are available.
    """
    y = np.asarray(y)
    labelled = y >= 0
    if labelled.sum() < 2:
        return 1.0
    p, t = np.asarray(probs, float)[labelled], y[labelled]

    def nll(log_t: float) -> float:
        q = apply_temperature(p, math.exp(log_t))
        return float(-np.mean(np.log(np.clip(q[np.arange(len(t)), t], 1e-12, 1.0))))

    best = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def coverage_curve(y: np.ndarray, probs: np.ndarray, n_classes: int, target: float = 0.95,
                   steps: Sequence[float] = tuple(np.round(np.arange(0.1, 1.0001, 0.05), 2))) -> dict[str, Any]:
    """Accuracy and balanced accuracy on the most confident share of patients, for each coverage.

    ``coverage_at_target`` is the largest coverage whose balanced accuracy reaches ``target``
    (None if none does): the share of patients the model could report on its own.
    """
    y = np.asarray(y)
    confidence = np.asarray(probs).max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    curve = []
    for c in steps:
        keep = order[: max(1, int(round(c * len(y))))]
        pred = np.asarray(probs)[keep].argmax(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curve.append({"coverage": float(c), "min_confidence": float(confidence[keep].min()),
                          "accuracy": float(np.mean(pred == y[keep])),
                          "balanced_accuracy": balanced_accuracy(y[keep], pred, n_classes)})
    reached = [row["coverage"] for row in curve if row["balanced_accuracy"] >= target]
    return {"target_balanced_accuracy": target, "coverage_at_target": max(reached) if reached else None,
            "curve": curve}


def calibration_figure(y: np.ndarray, before: np.ndarray, after: np.ndarray, coverage: dict[str, Any],
                       path: Path, n_bins: int = 10) -> None:
    """``path`` (PNG): the reliability diagram before and after temperature scaling, and the coverage curve."""
    # matplotlib is imported here, not with the module: `milhema train` and `predict` need
    # fit_temperature / coverage_curve but draw nothing, and pyplot costs about a second to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    edges = np.linspace(0, 1, n_bins + 1)
    for probs, name in ((before, "before"), (after, "after")):
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
        bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
        xs = [confidence[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ys = [correct[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        left.plot(xs, ys, "o-", label=f"{name} temperature scaling")
    left.plot(edges, edges, "k--", lw=0.8, label="calibrated")
    left.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title="Reliability (out of fold)",
             xlim=(0, 1), ylim=(0, 1.02))
    left.legend(fontsize=8)
    curve = coverage["curve"]
    right.plot([r["coverage"] for r in curve], [r["balanced_accuracy"] for r in curve], "o-", label="balanced accuracy")
    right.plot([r["coverage"] for r in curve], [r["accuracy"] for r in curve], "s-", ms=3, label="accuracy")
    right.axhline(coverage["target_balanced_accuracy"], color="grey", ls=":", lw=0.8)
    right.set(xlabel="coverage (most confident share of patients)", ylabel="score", ylim=(0, 1.02),
              title="Abstaining on the least confident")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
