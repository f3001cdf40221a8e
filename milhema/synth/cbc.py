"""Simulated complete blood counts, drawn per diagnosis around the medians of docs/DOMAIN.md.

Distributions overlap on purpose: MDS and VEXAS share macrocytic anaemia and cytopenias, AML
and MDS share thrombocytopenia, so a CBC-only classifier stays well below perfect and the
cells have to matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns written to patients.csv, in this order (units: G/L, T/L, g/dL, fL, %).
CBC_COLUMNS = ("wbc", "rbc", "hb", "mcv", "plt", "rdw", "anc", "alc", "amc", "aec", "abc")

# The white-cell differential of the CBC: neutrophils, lymphocytes, monocytes, eosinophils, basophils.
DIFFERENTIAL = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


@dataclass(frozen=True)
class CBCProfile:
    """Distribution of one diagnosis' CBC. ``*_log`` = (median, sd of the natural log)."""

    wbc_log: tuple[float, float]
    hb: tuple[float, float]
    mcv: tuple[float, float]
    plt_log: tuple[float, float]
    rdw: tuple[float, float]
    differential_alpha: tuple[float, float, float, float, float]  # Dirichlet over DIFFERENTIAL


PROFILES: dict[str, CBCProfile] = {
    "AML": CBCProfile(wbc_log=(9.0, 0.95), hb=(9.4, 1.9), mcv=(94.0, 7.0), plt_log=(75.0, 0.8),
                      rdw=(16.0, 2.0), differential_alpha=(4.0, 3.5, 1.0, 0.25, 0.08)),
    "MDS": CBCProfile(wbc_log=(4.6, 0.45), hb=(10.0, 1.7), mcv=(98.0, 7.0), plt_log=(120.0, 0.6),
                      rdw=(16.0, 2.0), differential_alpha=(5.0, 4.0, 0.8, 0.25, 0.08)),
    "VEXAS": CBCProfile(wbc_log=(5.4, 0.45), hb=(10.6, 1.6), mcv=(99.0, 6.5), plt_log=(140.0, 0.55),
                        rdw=(15.5, 2.0), differential_alpha=(7.0, 2.6, 1.0, 0.2, 0.06)),
    "reactive": CBCProfile(wbc_log=(10.0, 0.5), hb=(12.2, 1.9), mcv=(90.0, 6.0), plt_log=(270.0, 0.5),
                           rdw=(13.8, 1.3), differential_alpha=(6.0, 3.5, 1.0, 0.3, 0.06)),
}


def sample_cbc(diagnosis: str, rng: np.random.Generator, blast_fraction: float = 0.0,
               missing_rate: float = 0.1) -> tuple[dict[str, float], np.ndarray]:
    """One patient's CBC and the white-cell differential it implies.

    Args:
        blast_fraction: fraction of circulating white cells that are blasts (AML, MDS); they
            are part of the WBC but of none of the differential counts.
        missing_rate: probability that each value is missing (``nan``).

    Returns:
        ``(cbc, differential)``: values by :data:`CBC_COLUMNS` (nan = missing) and the
        proportions ``[5]`` over :data:`DIFFERENTIAL` (sum 1) used to draw the smear's cells.
    """
    p = PROFILES[diagnosis]
    wbc = float(np.clip(p.wbc_log[0] * np.exp(rng.normal(0.0, p.wbc_log[1])), 0.4, 300.0))
    hb = float(np.clip(rng.normal(*p.hb), 4.5, 18.5))
    mcv = float(np.clip(rng.normal(*p.mcv), 68.0, 125.0))
    mchc = rng.normal(33.5, 1.0)
    rbc = hb / (mcv * mchc) * 1000.0  # Hb (g/dL) = RBC (T/L) · MCV (fL) · MCHC (g/dL) / 1000
    plt = float(np.clip(p.plt_log[0] * np.exp(rng.normal(0.0, p.plt_log[1])), 3.0, 1200.0))
    rdw = float(np.clip(rng.normal(*p.rdw), 11.0, 30.0))
    differential = rng.dirichlet(p.differential_alpha)
    counts = wbc * (1.0 - blast_fraction) * differential
    cbc = {"wbc": wbc, "rbc": rbc, "hb": hb, "mcv": mcv, "plt": plt, "rdw": rdw,
           "anc": counts[0], "alc": counts[1], "amc": counts[2], "aec": counts[3], "abc": counts[4]}
    precision = {"wbc": 2, "rbc": 2, "hb": 1, "mcv": 1, "plt": 0, "rdw": 1,
                 "anc": 2, "alc": 2, "amc": 2, "aec": 2, "abc": 2}
    missing = rng.random(len(CBC_COLUMNS)) < missing_rate
    out = {c: (float("nan") if m else round(float(cbc[c]), precision[c])) for c, m in zip(CBC_COLUMNS, missing, strict=True)}
    return out, differential
