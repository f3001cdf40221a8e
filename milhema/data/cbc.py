"""What milhema knows of the complete blood count: adult reference ranges (see docs/DOMAIN.md) and
low/high flags (the patient report), and which columns are CBC quantities (never negative)."""

from __future__ import annotations

import math

# Keyed by CBC column name as used in patients.csv (lower case), with common aliases. Units as
# on a French lab report: G/L, T/L, g/dL, %, fL, pg. Only columns listed here are flagged.
REFERENCE_RANGES: dict[str, tuple[float, float, str]] = {
    "wbc": (4.0, 10.0, "G/L"),
    "rbc": (4.50, 5.90, "T/L"),
    "hb": (13.5, 17.5, "g/dL"),
    "hgb": (13.5, 17.5, "g/dL"),
    "hct": (40.0, 52.0, "%"),
    "mcv": (80.0, 98.0, "fL"),
    "mchc": (32.0, 38.0, "g/dL"),
    "mch": (26.0, 32.0, "pg"),
    "rdw": (12.0, 14.5, "%"),
    "plt": (150.0, 400.0, "G/L"),
    "platelets": (150.0, 400.0, "G/L"),
    "mpv": (7.4, 11.7, "fL"),
    "retic": (25.0, 100.0, "G/L"),
    "reticulocytes": (25.0, 100.0, "G/L"),
    "anc": (1.70, 7.50, "G/L"),
    "neutrophils": (1.70, 7.50, "G/L"),
    "alc": (1.50, 4.00, "G/L"),
    "lymphocytes": (1.50, 4.00, "G/L"),
    "amc": (0.15, 0.90, "G/L"),
    "monocytes": (0.15, 0.90, "G/L"),
    "aec": (0.04, 0.50, "G/L"),
    "eosinophils": (0.04, 0.50, "G/L"),
    "abc": (0.00, 0.06, "G/L"),
    "basophils": (0.00, 0.06, "G/L"),
}


def is_cbc_quantity(column: str) -> bool:
    """Whether ``column`` (any case) names a CBC quantity milhema knows: a count, a concentration or an index."""
    return column.lower() in REFERENCE_RANGES


def cbc_flag(column: str, value: float) -> tuple[str, str]:
    """``(flag, reference)``: flag is "low", "high", "" (in range or no known range) or "missing"."""
    if value is None or not math.isfinite(value):
        return "missing", _reference(column)
    known = REFERENCE_RANGES.get(column.lower())
    if known is None:
        return "", ""
    low, high, _ = known
    return ("low" if value < low else "high" if value > high else ""), _reference(column)


def _reference(column: str) -> str:
    known = REFERENCE_RANGES.get(column.lower())
    return "" if known is None else f"{known[0]:g}–{known[1]:g} {known[2]}"
