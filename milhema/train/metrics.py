"""Classification metrics with bootstrap confidence intervals over patients.

Each metric is reported as ``{"mean": point estimate on all patients, "std": bootstrap standard
deviation, "ci95": [2.5th, 97.5th bootstrap percentile]}``: patients are resampled with
replacement, ``n_boot`` times, with a fixed seed so reports are repeatable.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

SUMMARY_METRICS = ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy", "ece")


def macro_auroc(y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    """One-vs-rest AUROC averaged over the classes present with both outcomes (nan if none)."""
    values = [roc_auc_score(y == k, prob[:, k]) for k in range(n_classes) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(values)) if values else float("nan")


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins (0 = perfectly calibrated)."""
    if len(y) == 0:
        return float("nan")
    confidence = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def _point(name: str, y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    pred = prob.argmax(axis=1)
    if name == "ece":
        return expected_calibration_error(y, prob)
    if name == "balanced_accuracy":
        return float(balanced_accuracy_score(y, pred))
    if name == "macro_f1":
        return float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0))
    if name == "accuracy":
        return float(accuracy_score(y, pred))
    return macro_auroc(y, prob, n_classes)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Bootstrap sd and 95% percentile interval of ``stat(indices)`` over ``n`` items."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # resamples that miss a class are expected; sklearn warns on each
        warnings.simplefilter("ignore")
        values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    return float(values.std()), [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def classification_metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """Metrics of predicted probabilities ``prob [P, K]`` against labels ``y [P]`` (ints into ``classes``)."""
    y = np.asarray(y)
    prob = np.asarray(prob, dtype=float)
    k = len(classes)
    out: dict[str, Any] = {}
    for name in SUMMARY_METRICS:
        std, ci = bootstrap(lambda idx, name=name: _point(name, y[idx], prob[idx], k), len(y), n_boot, seed)
        with warnings.catch_warnings():  # a small cohort may never predict some class: expected
            warnings.simplefilter("ignore")
            out[name] = {"mean": _point(name, y, prob, k), "std": std, "ci95": ci}
    pred = prob.argmax(axis=1)
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(k))).tolist()
    f1 = f1_score(y, pred, average=None, labels=list(range(k)), zero_division=0)
    out["per_class"] = {
        c: {"auroc": float(roc_auc_score(y == i, prob[:, i])) if 0 < (y == i).sum() < len(y) else None,
            "f1": float(f1[i]), "n": int((y == i).sum())}
        for i, c in enumerate(classes)
    }
    return out


def summarise_repeats(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Metrics of out-of-fold probabilities ``[R, P, K]`` from R repeats of cross-validation.

    With one repeat this is :func:`classification_metrics`. With several, each summary metric's
    ``mean`` and ``std`` are over the repeats' point estimates, and ``ci95`` is the bootstrap
    interval of the repeat-averaged probabilities.
    """
    averaged = classification_metrics(y, probs.mean(axis=0), classes, n_boot=n_boot, seed=seed)
    if len(probs) == 1:
        return averaged
    for name in SUMMARY_METRICS:
        values = [_point(name, y, p, len(classes)) for p in probs]
        averaged[name]["mean"] = float(np.mean(values))
        averaged[name]["std"] = float(np.std(values))
        averaged[name]["per_repeat"] = values
    return averaged


def format_ci(metric: dict[str, Any]) -> str:
    """``0.83 [0.71, 0.92]``."""
    lo, hi = metric["ci95"]
    return f"{metric['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
