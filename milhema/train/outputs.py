"""Writing a run folder's tables: predictions, slide predictions, per-cell scores.

Files are written under a temporary name and renamed (:mod:`milhema.io`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from milhema.io import write_csv
from milhema.train.data import PatientBag


def prediction_rows(ids: Sequence[str], labels: Sequence[str | None], probs: np.ndarray, classes: Sequence[str],
                    extra: Sequence[Sequence[object]] = ()) -> list[list[object]]:
    """``id, label, pred, prob_<class>..., *extra`` rows."""
    rows = []
    for i, (pid, label) in enumerate(zip(ids, labels, strict=True)):
        row: list[object] = [pid, label or "", classes[int(probs[i].argmax())], *(f"{p:.6f}" for p in probs[i])]
        rows.append(row + (list(extra[i]) if extra else []))
    return rows


def prediction_header(first: str, classes: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return [first, "label", "pred", *(f"prob_{c}" for c in classes), *extra]


def rank_percentiles(scores: np.ndarray) -> np.ndarray:
    """Percentile rank in (0, 100] of each score within its bag (100 = most attended)."""
    if len(scores) == 0:
        return scores
    return 100.0 * rankdata(scores, method="average") / len(scores)


def write_cell_scores(folder: Path, bag: PatientBag, scores: np.ndarray, class_scores: np.ndarray | None,
                      classes: Sequence[str]) -> None:
    """One ``<slide_id>.csv`` per slide of the patient: cell_id, score, rank_pct (within the patient), per-class."""
    pct = rank_percentiles(scores)
    header = ["cell_id", "score", "rank_pct"] + ([f"score_{c}" for c in classes] if class_scores is not None else [])
    for s, slide_id in enumerate(bag.slide_ids):
        sel = np.flatnonzero(bag.slide_index == s)
        rows = []
        for i in sel:
            row: list[object] = [bag.cell_ids[i], f"{scores[i]:.6g}", f"{pct[i]:.2f}"]
            if class_scores is not None:
                row += [f"{v:.6g}" for v in class_scores[i]]
            rows.append(row)
        write_csv(folder / f"{slide_id}.csv", header, rows)
