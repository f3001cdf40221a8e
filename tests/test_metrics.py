"""The fast metric implementations used in the bootstrap equal scikit-learn's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from milhema.train.metrics import _point, classification_metrics, diagnostic_auroc


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for trial in range(60):
        n, k = int(rng.integers(3, 60)), int(rng.integers(2, 6))
        y = rng.integers(0, k, n)
        prob = rng.dirichlet(np.ones(k), n)
        if trial % 3 == 0:
            prob = np.round(prob, 1)   # ties in the scores
        pred = prob.argmax(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # sklearn warns when a class is absent from y
            expected = {
                "balanced_accuracy": balanced_accuracy_score(y, pred),
                "macro_f1": f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0),
                "accuracy": accuracy_score(y, pred),
            }
        aucs = [roc_auc_score(y == c, prob[:, c]) for c in range(k) if 0 < (y == c).sum() < n]
        expected["macro_auroc"] = float(np.mean(aucs)) if aucs else float("nan")
        for name, value in expected.items():
            got = _point(name, y, prob, k)
            assert got == pytest.approx(value, abs=1e-12, nan_ok=True), (name, trial)


def test_bootstrap_interval_holds_the_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    prob = np.eye(3)[y] * 0.25 + rng.dirichlet(np.ones(3), 120) * 0.75
    metrics = classification_metrics(y, prob, ["a", "b", "c"], n_boot=300)
    for name in ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy"):
        lo, hi = metrics[name]["ci95"]
        assert lo <= metrics[name]["mean"] <= hi and metrics[name]["std"] > 0


def test_repeats_interval_brackets_the_mean_of_the_repeats() -> None:
    """Each repeat is right on a different third of the patients (accuracy 1/3), while the
    repeat-averaged probabilities are right on all: the interval must describe the reported mean."""
    from milhema.train.metrics import summarise_repeats

    n, repeats = 30, 3
    y = np.arange(n) % 2
    probs = np.zeros((repeats, n, 2))
    for r in range(repeats):
        right = (np.arange(n) // 10) == r
        p_true = np.where(right, 0.9, 0.4)
        probs[r, np.arange(n), y] = p_true
        probs[r, np.arange(n), 1 - y] = 1 - p_true
    out = summarise_repeats(y, probs, ["a", "b"], n_boot=200)
    acc = out["accuracy"]
    assert acc["per_repeat"] == pytest.approx([1 / 3] * 3) and acc["mean"] == pytest.approx(1 / 3)
    for name in ("balanced_accuracy", "macro_f1", "accuracy", "macro_auroc"):
        lo, hi = out[name]["ci95"]
        # Percentile intervals of such an all-or-nothing construction may sit a hair off the point;
        # an interval of the averaged probabilities would sit near 1.0, far above the 1/3 reported.
        assert lo - 0.02 <= out[name]["mean"] <= hi + 0.02, name
    assert np.trace(np.array(out["confusion_matrix"])) == n  # of the averaged probabilities


def test_diagnostic_auroc() -> None:
    result = diagnostic_auroc({"a": np.array([0.1, 0.9, 0.2]), "b": np.array([0.5, 0.4]), "c": np.array([1.0])},
                              {"a": np.array([False, True, False]), "b": np.array([False, True]),
                               "c": np.array([True])})
    assert result == {"mean": 0.5, "median": 0.5, "n_patients": 2}
    assert diagnostic_auroc({"a": np.ones(2)}, {"a": None})["n_patients"] == 0


def test_slides_of_one_patient_are_resampled_together() -> None:
    """Five copies of each patient's slide are not five patients: the interval must not narrow."""
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 12), 5)
    prob = np.repeat(rng.dirichlet(np.ones(2), 12), 5, axis=0)
    groups = np.repeat(np.arange(12), 5)
    by_slide = classification_metrics(y, prob, ["a", "b"])["balanced_accuracy"]
    by_patient = classification_metrics(y, prob, ["a", "b"], groups=groups)["balanced_accuracy"]
    once = classification_metrics(y[::5], prob[::5], ["a", "b"])["balanced_accuracy"]
    width = [m["ci95"][1] - m["ci95"][0] for m in (by_slide, by_patient, once)]
    assert by_slide["mean"] == by_patient["mean"] == once["mean"]
    assert width[1] > 1.5 * width[0] and abs(width[1] - width[2]) < 0.1


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    """Labels drawn from softmax(z / 2.5) while the model reports softmax(z): the fitted T is ~2.5,
    and scaling by it lowers ECE and Brier score on new patients drawn the same way."""
    from milhema.train.calibration import apply_temperature, fit_temperature
    from milhema.train.metrics import brier, expected_calibration_error

    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(scale=4.0, size=(n, 3))
        truth = np.exp(z / 2.5) / np.exp(z / 2.5).sum(1, keepdims=True)
        y = np.array([rng.choice(3, p=p) for p in truth])
        return np.exp(z) / np.exp(z).sum(1, keepdims=True), y

    val_probs, val_y = draw(2000)
    t = fit_temperature(val_probs, val_y)
    assert 2.2 < t < 2.8
    test_probs, test_y = draw(2000)
    scaled = apply_temperature(test_probs, t)
    assert (scaled.argmax(1) == test_probs.argmax(1)).all()   # the predicted class never changes
    assert expected_calibration_error(test_y, scaled) < 0.5 * expected_calibration_error(test_y, test_probs)
    assert brier(test_y, scaled) < brier(test_y, test_probs)
    assert fit_temperature(val_probs[:1], val_y[:1]) == 1.0   # too few patients to fit: unchanged


def test_coverage_curve_abstains_on_the_least_confident() -> None:
    from milhema.train.calibration import coverage_curve

    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    confident_right = np.array([[0.95, 0.05], [0.1, 0.9], [0.9, 0.1], [0.15, 0.85]])
    unsure_wrong = np.array([[0.45, 0.55], [0.55, 0.45], [0.48, 0.52], [0.52, 0.48]])
    curve = coverage_curve(y, np.vstack([confident_right, unsure_wrong]), 2, steps=(0.25, 0.5, 0.75, 1.0))
    rows = {r["coverage"]: r for r in curve["curve"]}
    assert rows[0.5]["balanced_accuracy"] == 1.0 and rows[1.0]["balanced_accuracy"] == 0.5
    assert curve["coverage_at_target"] == 0.5 and rows[0.5]["min_confidence"] == 0.85
