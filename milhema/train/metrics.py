"""Classification metrics with bootstrap confidence intervals over patients, and the faithfulness
of cell scores (:func:`diagnostic_auroc`).

Each metric is reported as ``{"mean": point estimate on all patients, "std": bootstrap standard
deviation, "ci95": [2.5th, 97.5th bootstrap percentile]}``: patients are resampled with
replacement, ``n_boot`` times, with a fixed seed so reports are repeatable.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

SUMMARY_METRICS = ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy", "ece", "brier")


def macro_auroc(y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    """One-vs-rest AUROC averaged over the classes present with both outcomes (nan if none).

    Computed from ranks (Mann–Whitney U, ties averaged): the same value as scikit-learn's
    ``roc_auc_score`` at a fraction of its cost, which matters inside a 1,000-fold bootstrap.
    """
    values = []
    n = len(y)
    for k in range(n_classes):
        positive = y == k
        n_pos = int(positive.sum())
        if 0 < n_pos < n:
            ranks = rankdata(prob[:, k])
            values.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
    return float(np.mean(values)) if values else float("nan")


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y`` (as scikit-learn's balanced_accuracy_score)."""
    cm = _confusion(y, pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """F1 averaged over all ``n_classes`` labels, 0 where undefined (scikit-learn's zero_division=0)."""
    cm = _confusion(y, pred, n_classes)
    tp = np.diag(cm).astype(float)
    denominator = cm.sum(axis=0) + cm.sum(axis=1)   # 2·tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean())


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


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    """Multi-class Brier score: mean squared distance of ``prob [P, K]`` to the one-hot labels (0 = perfect)."""
    if len(y) == 0:
        return float("nan")
    onehot = np.zeros_like(prob)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((prob - onehot) ** 2, axis=1)))


def _point(name: str, y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    pred = prob.argmax(axis=1)
    if name == "ece":
        return expected_calibration_error(y, prob)
    if name == "brier":
        return brier(y, prob)
    if name == "balanced_accuracy":
        return balanced_accuracy(y, pred, n_classes)
    if name == "macro_f1":
        return _macro_f1(y, pred, n_classes)
    if name == "accuracy":
        return float(np.mean(y == pred)) if len(y) else float("nan")
    return macro_auroc(y, prob, n_classes)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
              groups: np.ndarray | None = None) -> tuple[float, list[float]]:
    """Bootstrap sd and 95% percentile interval of ``stat(indices)`` over ``n`` items.

    With ``groups`` (``[n]``, e.g. the patient of each slide) whole groups are resampled, each
    bringing all its items: the interval then reflects how many independent patients there are,
    not how many slides they have.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        def draw() -> np.ndarray:
            return rng.integers(0, n, n)
    else:
        members = [np.flatnonzero(groups == g) for g in dict.fromkeys(np.asarray(groups).tolist())]

        def draw() -> np.ndarray:
            picked = rng.integers(0, len(members), len(members))
            return np.concatenate([members[i] for i in picked])
    with warnings.catch_warnings():  # resamples that miss a class are expected; sklearn warns on each
        warnings.simplefilter("ignore")
        values = np.array([stat(draw()) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    return float(values.std()), [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def classification_metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000,
                           seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of predicted probabilities ``prob [P, K]`` against labels ``y [P]`` (ints into ``classes``).

    ``groups`` (``[P]``): rows that belong together (the slides of one patient), resampled together.
    """
    y = np.asarray(y)
    prob = np.asarray(prob, dtype=float)
    k = len(classes)
    out: dict[str, Any] = {}
    for name in SUMMARY_METRICS:
        def stat(idx: np.ndarray, name: str = name) -> float:
            return _point(name, y[idx], prob[idx], k)

        std, ci = bootstrap(stat, len(y), n_boot, seed, groups)
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
                      seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of out-of-fold probabilities ``[R, P, K]`` from R repeats of cross-validation.

    With one repeat this is :func:`classification_metrics`. With several, each summary metric's
    ``mean`` is the average of the repeats' point estimates, ``std`` their spread, and ``ci95``
    the bootstrap interval of that same average (each resample of patients scored in every
    repeat), so the interval always describes the number it brackets. The confusion matrix and
    per-class scores are those of the repeat-averaged probabilities. ``groups`` as in
    :func:`classification_metrics`.
    """
    probs = np.asarray(probs, dtype=float)
    averaged = classification_metrics(y, probs.mean(axis=0), classes, n_boot=n_boot, seed=seed, groups=groups)
    if len(probs) == 1:
        return averaged
    y = np.asarray(y)
    k = len(classes)
    for name in SUMMARY_METRICS:
        with warnings.catch_warnings():  # a small cohort may never predict some class: expected
            warnings.simplefilter("ignore")
            values = [_point(name, y, p, k) for p in probs]
        def mean_stat(idx: np.ndarray, name: str = name) -> float:
            return float(np.mean([_point(name, y[idx], p[idx], k) for p in probs]))

        _, ci = bootstrap(mean_stat, len(y), n_boot, seed, groups)
        averaged[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "ci95": ci,
                          "per_repeat": values}
    return averaged


def format_ci(metric: dict[str, Any]) -> str:
    """``0.83 [0.71, 0.92]``."""
    lo, hi = metric["ci95"]
    return f"{metric['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


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
