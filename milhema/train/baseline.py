"""Patient-level baselines in scikit-learn: CBC only, and mean-pooled cell features.

They run on exactly the same patient-grouped folds as the MIL models, so the numbers can be
set side by side. Missing CBC values are imputed with the training-fold median plus a
missing-indicator column; counts are log-transformed first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
