"""Per-cell scores of a run's model(s) for a patient: attention, or occlusion (model-agnostic).

Both use the same models as ``milhema predict``: for a cv run, a patient the run tested is
scored by the fold model(s) that held it out (averaged over repeats), any other patient by all
fold models. Scores are ``[N]`` over the cells of the patient's :class:`PatientBag` (all slides
concatenated in slides.csv order).
"""

from __future__ import annotations

import math
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


# "Nearly uniform" attention: the most attended cell weighs less than this many times the median
# cell. Then the model pooled the cells almost as a plain mean and its ranking is mostly noise.
UNIFORM_MAX_OVER_MEDIAN = 2.0
# Occlusion scores: no cell changes the predicted probability by more than this (1 percentage point).
OCCLUSION_MIN_EFFECT = 0.01


@dataclass(frozen=True)
class Contrast:
    """Whether a score vector singles out cells, with the numbers behind the decision.

    Attributes:
        singled_out: False when the scores are nearly uniform (see :func:`score_contrast`).
        statistic: attention: max / median; occlusion: the largest change of probability (absolute).
        entropy: attention: entropy of the scores relative to log N (1 = uniform); NaN for occlusion.
        text: one sentence for the report.
    """

    singled_out: bool
    statistic: float
    entropy: float
    text: str


def score_contrast(scores: np.ndarray, method: str) -> Contrast:
    """Decide whether ``scores [N]`` of ``method`` rank cells or are nearly uniform.

    Attention (weights >= 0): nearly uniform when the most attended cell weighs less than
    :data:`UNIFORM_MAX_OVER_MEDIAN` times the median cell. The median, not the minimum, so that one
    near-zero cell (an artefact) does not make a flat bag look contrasted; the maximum, not the
    entropy, because one cell at ten times the others barely moves the entropy of a 500-cell bag.
    Occlusion (change of the predicted probability when a cell is removed): nearly uniform when no
    cell changes it by more than :data:`OCCLUSION_MIN_EFFECT` (1 percentage point).
    """
    x = np.asarray(scores, np.float64)
    n = len(x)
    if n < 2:
        return Contrast(False, math.nan, math.nan, "fewer than two cells: nothing to rank")
    if method == "occlusion":
        effect = float(np.abs(x).max())
        if effect <= OCCLUSION_MIN_EFFECT:
            return Contrast(False, effect, math.nan,
                            f"the model did not single out cells: removing any one of the {n} cells changes the "
                            f"predicted probability by at most {100 * effect:.2g} percentage points "
                            f"(≤ {100 * OCCLUSION_MIN_EFFECT:g})")
        return Contrast(True, effect, math.nan, f"removing one cell changes the predicted probability by up to "
                                                f"{100 * effect:.2g} percentage points")
    weights = np.clip(x, 0.0, None)
    median = float(np.median(weights))
    ratio = float(weights.max() / median) if median > 0 else math.inf
    p = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1.0 / n)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(n))
    span = f"attention {x.min():.3g}–{x.max():.3g} over {n} cells"
    if ratio < UNIFORM_MAX_OVER_MEDIAN:
        return Contrast(False, ratio, entropy,
                        f"the model did not single out cells: {span}; the most attended cell weighs {ratio:.2f} "
                        f"times the median cell (< {UNIFORM_MAX_OVER_MEDIAN:g}), entropy {entropy:.3f} of the "
                        "uniform maximum")
    shown = "more than 100" if not math.isfinite(ratio) or ratio > 100 else f"{ratio:.3g}"
    return Contrast(True, ratio, entropy, f"{span}; the most attended cell weighs {shown} times the median cell")
