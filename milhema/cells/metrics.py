"""Scores of a cell classifier on held-out patients, with bootstrap intervals that resample patients.

Cells of one patient are not independent (one stain, one smear, one disease), so every interval
resamples whole patients (:func:`milhema.train.metrics.bootstrap` with ``groups``): it reflects how
many patients were held out, not how many cells they had.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)
import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_fscore_support  # noqa: E402

from milhema.differential import cell_differential  # noqa: E402
from milhema.train.metrics import balanced_accuracy, bootstrap, brier, expected_calibration_error  # noqa: E402


def _summary(value: float, stat: Any, n: int, n_boot: int, seed: int, groups: np.ndarray) -> dict[str, Any]:
    std, ci = bootstrap(stat, n, n_boot, seed, groups)
    return {"mean": value, "std": std, "ci95": ci}


def type_metrics(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, types: Sequence[str], patients: np.ndarray, *,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Of predicted types ``pred [M]`` against annotated ``y [M]``: per type precision, recall, F1 and
    support; the confusion matrix (rows: annotated, columns: predicted); balanced accuracy (mean recall
    over the types present) with a patient bootstrap; accuracy, macro F1; and ECE and Brier of the
    calibrated probabilities ``probs [M, T]``."""
    y, probs, pred = np.asarray(y), np.asarray(probs, np.float64), np.asarray(pred)
    k = len(types)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    present = support > 0
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    return {
        "balanced_accuracy": _summary(balanced_accuracy(y, pred, k),
                                      lambda idx: balanced_accuracy(y[idx], pred[idx], k), len(y), n_boot, seed, patients),
        "chance_balanced_accuracy": 1.0 / max(int(present.sum()), 1),
        "accuracy": float(np.mean(pred == y)) if len(y) else math.nan,
        "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
        "ece": expected_calibration_error(y, probs), "brier": brier(y, probs),
        "per_type": {t: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])} for i, t in enumerate(types)},
        "confusion_matrix": {"types": list(types), "rows": "annotated type", "columns": "predicted type",
                             "counts": cm.tolist()},
    }


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for ``truth`` (0/1) from ranks (ties averaged); NaN without both outcomes."""
    n_pos = int(truth.sum())
    if n_pos == 0 or n_pos == len(truth):
        return math.nan
    ranks = rankdata(score)
    return float((ranks[truth == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(truth) - n_pos)))


def _average_precision(truth: np.ndarray, score: np.ndarray) -> float:
    if truth.sum() == 0:
        return math.nan
    return float(average_precision_score(truth, score))


def attribute_metrics(truth: np.ndarray, probs: np.ndarray, names: Sequence[str], patients: np.ndarray, *,
                      n_boot: int = 300, seed: int = 0) -> dict[str, Any]:
    """Per attribute: AUROC and average precision of ``probs [M, A]`` against ``truth [M, A]`` (1, 0; -1 not
    annotated, left out), with patient-bootstrap intervals; prevalence and counts beside them (AP's chance
    level is the prevalence)."""
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        known = truth[:, j] >= 0
        t, s, g = truth[known, j].astype(np.int64), probs[known, j], patients[known]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = {
                "auroc": _summary(auroc(t, s), lambda idx, t=t, s=s: auroc(t[idx], s[idx]), len(t), n_boot, seed, g),
                "average_precision": _summary(_average_precision(t, s),
                                              lambda idx, t=t, s=s: _average_precision(t[idx], s[idx]),
                                              len(t), n_boot, seed, g),
                "positives": int(t.sum()), "annotated": int(len(t)),
                "prevalence": float(t.mean()) if len(t) else math.nan,
            }
    return out


def differential_error(y: np.ndarray, probs: np.ndarray, types: Sequence[str], patients: np.ndarray) -> dict[str, Any]:
    """Per type, over held-out patients: mean absolute error (percentage points) of the predicted differential
    (``100 sum_i p[i, t] / N`` over the patient's annotated cells) against the annotated one, the mean
    annotated percentage beside it, and how often the 95 % interval holds the annotated percentage."""
    errors: dict[str, list[float]] = {t: [] for t in types}
    covered: dict[str, list[bool]] = {t: [] for t in types}
    truth_pct: dict[str, list[float]] = {t: [] for t in types}
    for pid in dict.fromkeys(patients.tolist()):
        rows = patients == pid
        observed = 100 * np.bincount(y[rows], minlength=len(types)) / rows.sum()
        for t, est, obs in zip(types, cell_differential(probs[rows]), observed, strict=True):
            errors[t].append(abs(est.percent - obs))
            covered[t].append(est.low - 1e-9 <= obs <= est.high + 1e-9)
            truth_pct[t].append(float(obs))
    per_type = {t: {"mae_pp": float(np.mean(errors[t])), "mean_annotated_pct": float(np.mean(truth_pct[t])),
                    "coverage_95": float(np.mean(covered[t]))} for t in types}
    return {"patients": len(dict.fromkeys(patients.tolist())), "per_type": per_type,
            "mae_pp_mean_over_types": float(np.mean([v["mae_pp"] for v in per_type.values()])),
            "coverage_95_mean_over_types": float(np.mean([v["coverage_95"] for v in per_type.values()]))}


def confusion_figure(counts: np.ndarray, types: Sequence[str], path: Path, title: str) -> None:
    """``path`` (PNG): the confusion matrix, each row normalised to the annotated type's cells, counts written in."""
    counts = np.asarray(counts)
    k = len(types)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    size = max(5.0, 0.45 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), types, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), [f"{t} ({int(rows[i, 0])})" for i, t in enumerate(types)], fontsize=8)
    ax.set(xlabel="predicted type", ylabel="annotated type (cells)", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the annotated type's cells")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
