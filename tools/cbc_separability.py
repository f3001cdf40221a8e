"""How well the simulated CBC alone separates the diagnoses (the table in docs/SIMULATION.md).

    python tools/cbc_separability.py [--patients 2000] [--seed 7]

Draws patients exactly as `milhema synth` does (without rendering cells) and reports the
5-fold cross-validated balanced accuracy of two CBC-only classifiers per difficulty.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from milhema.config import DEFAULTS
from milhema.synth.cbc import sample_cbc
from milhema.synth.cohort import DIAGNOSES
from milhema.synth.composition import DIFFICULTIES, blood_blast_fraction, sample_disease
from milhema.train.baseline import logistic_model


def draw(n: int, difficulty: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    columns = DEFAULTS["data"]["patient_features"]
    logged = DEFAULTS["data"]["log_features"]
    x, y = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        k = i % len(DIAGNOSES)
        state = sample_disease(DIAGNOSES[k], difficulty, rng)
        cbc, _ = sample_cbc(DIAGNOSES[k], rng, blood_blast_fraction(state))
        x.append([np.log1p(cbc[c]) if c in logged else cbc[c] for c in columns])
        y.append(k)
    return np.array(x), np.array(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    print(f"{'difficulty':<12}{'logistic regression':>22}{'gradient boosting':>20}")
    for difficulty in DIFFICULTIES:
        x, y = draw(args.patients, difficulty, args.seed)
        scores = [balanced_accuracy_score(y, cross_val_predict(model, x, y, cv=cv))
                  for model in (logistic_model(), HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05))]
        print(f"{difficulty:<12}{scores[0]:>22.3f}{scores[1]:>20.3f}")


if __name__ == "__main__":
    main()
