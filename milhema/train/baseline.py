"""Patient-level baselines in scikit-learn: CBC only, and mean-pooled cell features.

They run on exactly the same patient-grouped folds as the MIL models, so the numbers can be
set side by side. Missing CBC values are imputed with the training-fold median plus a
missing-indicator column; counts are log-transformed first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from milhema.bags import read_bag
from milhema.data.manifest import Cohort
from milhema.errors import BagError, MilhemaError


def cbc_design(cohort: Cohort, patient_ids: Sequence[str], log_columns: Sequence[str]) -> np.ndarray:
    """Patient-feature matrix ``[P, F]`` (the CBC ...) with the columns in ``log_columns`` as
    log(1 + x); nan stays nan. ``F`` is 0 for a cohort read without patient features."""
    x = cohort.patient_matrix(patient_ids)
    for j, column in enumerate(cohort.patient_features):
        if column in log_columns:
            x[:, j] = np.log1p(x[:, j])
    return x


def mean_pooled_features(cohort: Cohort, bags: str | Path | None, patient_ids: Sequence[str],
                         columns: Sequence[int] | None = None) -> np.ndarray:
    """Mean of every cell's features over all slides of each patient, ``[P, D]`` float32.

    ``columns`` restricts the features to those columns (see ``data.feature_blocks``).

    Raises:
        BagError: a slide has no bag, or feature sizes differ between bags.
    """
    rows = []
    dim = None
    for pid in patient_ids:
        feats = []
        for slide in cohort.slides_of(pid):
            path = slide.bag_path(bags)
            if not path.exists():
                raise BagError(f"slide {slide.slide_id}: no bag file {path} (run milhema embed first)")
            bag = read_bag(path, thumbnails=False)
            if columns is not None:
                bag.features = bag.features[:, list(columns)]
            if dim is not None and bag.feature_dim != dim:
                raise BagError(f"slide {slide.slide_id}: {bag.feature_dim} features per cell, other bags have {dim}")
            dim = bag.feature_dim
            feats.append(bag.features.astype(np.float32))
        cells = np.concatenate(feats) if feats else np.zeros((0, dim or 0), np.float32)
        rows.append(cells.mean(axis=0) if len(cells) else np.full(dim or 0, np.nan, np.float32))
    return np.stack(rows)


def logistic_model(seed: int = 0, c: float = 0.5) -> Pipeline:
    """Imputation (+ missing indicators), standardisation, L2 logistic regression."""
    return make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler(),
                         LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed))


def patient_folds(y: np.ndarray, folds: int, seed: int,
                  classes: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label-stratified K-fold over patients (one row per patient, so a patient is never on both sides)."""
    counts = np.bincount(y[y >= 0])
    if len(y) < folds or counts[counts > 0].min() < folds:
        names = classes or [str(i) for i in range(len(counts))]
        found = ", ".join(f"{names[i]} {n}" for i, n in enumerate(counts) if n > 0)
        raise MilhemaError(f"{folds}-fold cross-validation needs at least {folds} patients of every class; "
                           f"the cohort has {found} (use fewer --folds)")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y))
    for train, test in splits:
        if set(train) & set(test):  # cannot happen with one row per patient; checked because it must never
            raise MilhemaError("internal check failed: a patient is in both the training and the test fold")
    return splits


def cross_val_proba(x: np.ndarray, y: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                    n_classes: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities ``[P, K]`` of :func:`logistic_model`."""
    prob = np.zeros((len(y), n_classes))
    for train, test in splits:
        model = logistic_model(seed).fit(x[train], y[train])
        prob[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
    return prob


# Where a run keeps its CBC-only model (for predict's external validation).
BASELINE_FILE = "baselines/cbc_only.json"


def fit_cbc_baseline(x: np.ndarray, y: np.ndarray, classes: Sequence[str], columns: Sequence[str],
                     log_columns: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """The CBC-only model fitted on all of a run's labelled patients, as plain numbers (JSON, no pickle).

    ``x [P, F]`` is :func:`cbc_design`'s matrix of ``columns``; :func:`cbc_baseline_proba` applies
    the result to a new cohort, so an external validation compares the MIL model with the CBC
    alone on the same patients.
    """
    model = logistic_model(seed).fit(x, y)
    imputer, scaler, regression = model.steps[0][1], model.steps[1][1], model.steps[2][1]
    return {
        "format": "milhema-cbc-baseline", "columns": list(columns),
        "log_columns": [c for c in log_columns if c in columns], "classes": list(classes),
        "medians": imputer.statistics_.tolist(),
        "indicator_columns": [] if imputer.indicator_ is None else imputer.indicator_.features_.tolist(),
        "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
        "class_index": regression.classes_.tolist(), "coef": regression.coef_.tolist(),
        "intercept": regression.intercept_.tolist(),
    }


def cbc_baseline_proba(params: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """``[P, K]`` probabilities of the saved CBC-only model for the design matrix ``x [P, F]``
    (imputation with missing indicators, standardisation and the logistic regression, as fitted)."""
    x = np.asarray(x, float)
    filled = np.where(np.isnan(x), np.asarray(params["medians"]), x)
    design = np.hstack([filled, np.isnan(x[:, params["indicator_columns"]]).astype(float)])
    z = (design - np.asarray(params["mean"])) / np.asarray(params["scale"])
    logits = z @ np.asarray(params["coef"]).T + np.asarray(params["intercept"])
    if logits.shape[1] == 1:   # scikit-learn's binary model: one logit for the second class
        logits = np.hstack([np.zeros_like(logits), logits])
    logits -= logits.max(axis=1, keepdims=True)
    fitted = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.zeros((len(x), len(params["classes"])))
    probs[:, params["class_index"]] = fitted
    return probs
