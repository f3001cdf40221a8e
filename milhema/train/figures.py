"""Figures of a classification result: the confusion matrix and one-vs-rest ROC curves (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402


def classification_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """``path`` (PNG): confusion matrix (rows = truth) and ROC curves of ``probs [P, K]`` against ``y [P]``."""
    k = len(classes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    cm = confusion_matrix(y, probs.argmax(axis=1), labels=list(range(k)))
    left.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            left.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    left.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes, xlabel="predicted",
             ylabel="true", title="Confusion matrix")
    for i, name in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == i, probs[:, i])
            right.plot(fpr, tpr, label=name)
    right.plot([0, 1], [0, 1], "k--", lw=0.8)
    right.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one class vs the rest)")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
