"""What milhema knows of the complete blood count: adult reference ranges (see docs/DOMAIN.md) and
low/high flags (the patient report), and which columns are CBC quantities (never negative).

Hb, RBC and Hct have one range for women and one for men (:data:`SEX_RANGES`); every other
quantity one adult range (:data:`REFERENCE_RANGES`). A patient whose sex is not given (or not
recognised) is flagged only outside the range spanning both sexes (women's lower limit, men's
upper limit), so that no one is called anaemic for being a woman. Under 18 (``age`` column) the
adult ranges are shown but not applied: children's ranges change with the age band.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

# Keyed by CBC column name as used in patients.csv (lower case), with common aliases. Units as
# on a French lab report: G/L, T/L, g/dL, %, fL, pg. Only columns listed here (or in SEX_RANGES)
# are flagged. Sources: docs/DOMAIN.md, "The complete blood count".
REFERENCE_RANGES: dict[str, tuple[float, float, str]] = {
    "wbc": (4.0, 10.0, "G/L"),
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

# Adult ranges that differ between women ("F") and men ("M"). Women: Hb 12.0-16.0 g/dL (lower
# limit = WHO anaemia cut-off for non-pregnant women; 120-160 g/L in the French haematology
# teaching reference), RBC 4.2-5.4 T/L (MedlinePlus), Hct 37-47 % (Pagana, Mosby's Manual of
# Diagnostic and Laboratory Tests). Men: the ranges milhema has always used.
_HB = {"F": (12.0, 16.0, "g/dL"), "M": (13.5, 17.5, "g/dL")}
SEX_RANGES: dict[str, dict[str, tuple[float, float, str]]] = {
    "rbc": {"F": (4.20, 5.40, "T/L"), "M": (4.50, 5.90, "T/L")},
    "hb": _HB,
    "hgb": _HB,
    "hct": {"F": (37.0, 47.0, "%"), "M": (40.0, 52.0, "%")},
}

# Below this age (years, patients.csv `age`) the adult ranges are not applied.
ADULT_AGE = 18.0

# Spellings of the `sex` column, compared case-insensitively and without accents: English,
# French and German words and their initials. "W" is German "weiblich" (and English "woman"),
# "H" French "homme". Numeric codes (1/2, 0/1) are not read: their meaning differs between sources.
_SEX_SPELLINGS: dict[str, str] = {
    **dict.fromkeys(("f", "female", "woman", "w", "weiblich", "frau", "femme", "feminin", "fem"), "F"),
    **dict.fromkeys(("m", "male", "man", "mannlich", "maennlich", "mann", "h", "homme", "masculin", "masc"), "M"),
}
SEX_NAMES = {"F": "female", "M": "male"}


def normalise_sex(raw: str | None) -> str | None:
    """``"F"``, ``"M"``, or None where ``raw`` is empty or not a spelling milhema knows.

    Accepted (any case, accents ignored): F / female / woman / W (German *weiblich*) / femme /
    féminin and M / male / man / männlich / H (French *homme*) / masculin.
    """
    if raw is None:
        return None
    text = unicodedata.normalize("NFKD", raw.strip().lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).rstrip(".")
    return _SEX_SPELLINGS.get(text)


@dataclass(frozen=True)
class ReferenceRange:
    """An adult reference range and whom it is for.

    Attributes:
        low, high, unit: the range.
        population: ``"adults"``, ``"women"``, ``"men"`` or ``"either sex"`` (sex not known:
            women's lower and men's upper limit).
        applied: False when the patient is a child (age < :data:`ADULT_AGE`): shown, not flagged.
    """

    low: float
    high: float
    unit: str
    population: str = "adults"
    applied: bool = True

    def text(self) -> str:
        """As the report prints it, e.g. ``12–16 g/dL (women)``, ``4–10 G/L (adult range; not applied under 18)``."""
        base = f"{self.low:g}–{self.high:g} {self.unit}"
        whom = "" if self.population == "adults" else f" for {self.population}"
        if not self.applied:
            return f"{base} (adult range{whom}; not applied under {ADULT_AGE:g})"
        return base if self.population == "adults" else f"{base} ({self.population})"


def is_cbc_quantity(column: str) -> bool:
    """Whether ``column`` (any case) names a CBC quantity milhema knows: a count, a concentration or an index."""
    return column.lower() in REFERENCE_RANGES or column.lower() in SEX_RANGES


def reference_range(column: str, sex: str | None = None, age: float | None = None) -> ReferenceRange | None:
    """The range ``column`` is compared with for a patient of ``sex`` (any spelling) and ``age`` (years).

    None for a column milhema has no range for.
    """
    name = column.lower()
    applied = age is None or not math.isfinite(age) or age >= ADULT_AGE
    if name in SEX_RANGES:
        by_sex = SEX_RANGES[name]
        code = normalise_sex(sex)
        if code is not None:
            low, high, unit = by_sex[code]
            return ReferenceRange(low, high, unit, "women" if code == "F" else "men", applied)
        low = min(r[0] for r in by_sex.values())
        high = max(r[1] for r in by_sex.values())
        return ReferenceRange(low, high, by_sex["M"][2], "either sex", applied)
    if name in REFERENCE_RANGES:
        low, high, unit = REFERENCE_RANGES[name]
        return ReferenceRange(low, high, unit, "adults", applied)
    return None


def cbc_flag(column: str, value: float, sex: str | None = None, age: float | None = None) -> tuple[str, str]:
    """``(flag, reference)``: flag is "low", "high", "" (in range, no known range, or a child) or "missing".

    ``reference`` is the range's text (see :meth:`ReferenceRange.text`), "" without a range.
    """
    known = reference_range(column, sex, age)
    reference = "" if known is None else known.text()
    if value is None or not math.isfinite(value):
        return "missing", reference
    if known is None or not known.applied:
        return "", reference
    return ("low" if value < known.low else "high" if value > known.high else ""), reference
