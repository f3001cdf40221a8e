"""Which cells a simulated smear holds: the normal differential plus the diagnostic cells.

Rates per difficulty (fractions drawn uniformly per patient, shared by the patient's slides):

| difficulty | AML blasts (of all WBC) | MDS dysplastic (of neutrophils) | VEXAS vacuolated (of neutrophils + monocytes) | reactive lymphocytes (of all WBC) |
|---|---|---|---|---|
| easy    | 20–70% | 25–50% | 15–35% | 15–40% |
| default |  5–60% | 10–30% |  5–20% |  5–25% |
| hard    |  2–8%  |  2–6%  |  2–5%  |  2–6%  |

Every smear also carries look-alikes that are *not* diagnostic: about 1% hypogranular or
vacuolated neutrophils (storage and toxic artefacts), a few smudge cells, and bands.
MDS and VEXAS share features as in docs/DOMAIN.md: MDS dysplasia is mostly degranulation with some
pseudo-Pelger cells; VEXAS is mostly vacuoles, with pseudo-Pelger cells and some degranulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIFFICULTIES = ("easy", "default", "hard")

# (low, high) of the patient's diagnostic fraction, per diagnosis and difficulty.
RATES: dict[str, dict[str, tuple[float, float]]] = {
    "easy": {"AML": (0.20, 0.70), "MDS": (0.25, 0.50), "VEXAS": (0.15, 0.35), "reactive": (0.15, 0.40)},
    "default": {"AML": (0.05, 0.60), "MDS": (0.10, 0.30), "VEXAS": (0.05, 0.20), "reactive": (0.05, 0.25)},
    "hard": {"AML": (0.02, 0.08), "MDS": (0.02, 0.06), "VEXAS": (0.02, 0.05), "reactive": (0.02, 0.06)},
}

# Mix of dysplastic cell types for MDS / VEXAS (they overlap on purpose).
MDS_DYSPLASIA = {"hypogranular_neutrophil": 0.65, "pseudo_pelger": 0.30, "vacuolated_neutrophil": 0.05}
VEXAS_NEUTROPHIL = {"vacuolated_neutrophil": 0.65, "pseudo_pelger": 0.25, "hypogranular_neutrophil": 0.10}


@dataclass(frozen=True)
class DiseaseState:
    """Per-patient parameters of the diagnostic cells (shared by all the patient's slides)."""

    diagnosis: str
    fraction: float           # the diagnostic fraction of the table above
    auer_fraction: float = 0.0  # AML: fraction of blasts with Auer rods
    mds_blasts: float = 0.0   # MDS: blasts as a fraction of all WBC


def sample_disease(diagnosis: str, difficulty: str, rng: np.random.Generator) -> DiseaseState:
    """Draw a patient's disease parameters."""
    if difficulty not in RATES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    low, high = RATES[difficulty][diagnosis]
    fraction = float(rng.uniform(low, high))
    auer = float(rng.uniform(0.1, 0.35)) if diagnosis == "AML" and rng.random() < 0.4 else 0.0
    mds_blasts = float(rng.uniform(0.0, 0.04)) if diagnosis == "MDS" and difficulty != "hard" else 0.0
    return DiseaseState(diagnosis, fraction, auer, mds_blasts)


def blood_blast_fraction(state: DiseaseState) -> float:
    """Fraction of all white cells that are blasts (what the CBC's WBC includes)."""
    if state.diagnosis == "AML":
        return state.fraction
    return state.mds_blasts


def slide_cells(state: DiseaseState, differential: np.ndarray, n_cells: int, view: str,
                rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Cell types and diagnostic flags of one smear, in random order.

    Args:
        differential: proportions over neutrophil, lymphocyte, monocyte, eosinophil, basophil.
        view: ``PB`` (peripheral blood) or ``BM`` (marrow: more blasts and promyelocytes).
    """
    marrow = view == "BM"
    blasts = blood_blast_fraction(state) * (1.4 if marrow else 1.0)
    blasts = min(blasts * rng.uniform(0.8, 1.2), 0.9)  # slide-to-slide sampling variation
    promyelocytes = rng.uniform(0.03, 0.08) if marrow else (rng.uniform(0.0, 0.02) if state.diagnosis == "AML" else 0.0)
    smudge = rng.uniform(0.0, 0.04)
    reactive = state.fraction * rng.uniform(0.8, 1.2) if state.diagnosis == "reactive" else 0.0
    normal = max(0.0, 1.0 - blasts - promyelocytes - smudge - reactive)
    shares = np.array([blasts, promyelocytes, smudge, reactive, *(normal * differential)])
    groups = ["blast", "promyelocyte", "smudge", "reactive_lymphocyte",
              "neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    counts = rng.multinomial(n_cells, shares / shares.sum())
    cells: list[tuple[str, bool]] = []
    for group, count in zip(groups, counts, strict=True):
        for _ in range(count):
            cells.append(_refine(group, state, rng))
    order = rng.permutation(len(cells))
    return [cells[i] for i in order]


def _refine(group: str, state: DiseaseState, rng: np.random.Generator) -> tuple[str, bool]:
    """Turn a differential group into a concrete cell type and whether it is diagnostic."""
    d = state.diagnosis
    if group == "blast":
        auer = rng.random() < state.auer_fraction
        return ("blast_auer" if auer else "blast"), d in ("AML", "MDS")
    if group == "reactive_lymphocyte":
        return group, True
    if group == "neutrophil":
        left_shift = 0.12 if d == "reactive" else 0.04
        if d == "MDS" and rng.random() < state.fraction:
            return _pick(MDS_DYSPLASIA, rng), True
        if d == "VEXAS" and rng.random() < state.fraction:
            return _pick(VEXAS_NEUTROPHIL, rng), True
        u = rng.random()
        if u < 0.006:
            return "hypogranular_neutrophil", False
        if u < 0.012:
            return "vacuolated_neutrophil", False
        return ("band" if u < 0.012 + left_shift else "neutrophil"), False
    if group == "monocyte":
        if d == "VEXAS" and rng.random() < state.fraction:
            return "vacuolated_monocyte", True
        return ("vacuolated_monocyte" if rng.random() < 0.01 else "monocyte"), False
    return group, False


def _pick(weights: dict[str, float], rng: np.random.Generator) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]
