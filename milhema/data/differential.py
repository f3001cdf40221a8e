"""The white-cell differential of a patient's annotated cells ("formule leucocytaire"): count, share
with a 95 % Wilson interval, and flags where a share reaches a threshold of the WHO 2022 / ICC 2022
classifications (see docs/DOMAIN.md, "The differential").

Shares are of the *counted* white cells: smudge cells, detections that matched no annotated cell
(``unmatched``) and cells without a type are listed with their number but left out of the
denominator, as a smudge cell is left out of a manual differential.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from scipy.stats import binomtest

# Cell types listed but not counted in the denominator ("" = no type).
NOT_COUNTED = ("smudge", "unmatched", "")
NO_TYPE = "(no type)"


@dataclass(frozen=True)
class Tier:
    """A share (percent, point estimate) from which a measure is flagged, and what it means."""

    at_least: float
    flag: str
    meaning: str


@dataclass(frozen=True)
class Measure:
    """A share the thresholds apply to: cells of ``types`` among cells of ``of`` (None = all counted cells).

    ``tiers`` are checked highest first; a measure is flagged only when at least one of its cells is
    present and the share reaches a tier (``at_least`` 0 flags any such cell).
    """

    name: str
    types: tuple[str, ...]
    of: tuple[str, ...] | None
    tiers: tuple[Tier, ...]
    source: str


_NEUTROPHIL_LINEAGE = ("neutrophil", "band", "hypogranular_neutrophil", "pseudo_pelger", "vacuolated_neutrophil")

# Thresholds for peripheral blood, in percent of the counted white cells unless ``of`` says otherwise.
MEASURES: tuple[Measure, ...] = (
    Measure("blasts", ("blast", "blast_auer"), None, (
        Tier(20.0, "AML range", "≥ 20 % blasts: acute myeloid leukaemia (WHO 2022, ICC 2022)"),
        Tier(5.0, "high", "5–19 % blasts in blood: MDS with increased blasts 2 (WHO 2022 MDS-IB2); "
                          "10–19 % is MDS/AML in the ICC 2022"),
        Tier(2.0, "high", "2–4 % blasts in blood: MDS with increased blasts 1 (WHO 2022 MDS-IB1; ICC 2022 MDS-EB "
                          "2–9 %); blood normally holds none"),
    ), "WHO 2022 (Khoury et al., Leukemia 2022); ICC 2022 (Arber et al., Blood 2022)"),
    Measure("Auer rods", ("blast_auer",), None, (
        Tier(0.0, "Auer rods", "blasts with Auer rods: MDS-IB2 whatever the blast count (WHO 2022); frequent in AML"),
    ), "WHO 2022 (Khoury et al., Leukemia 2022)"),
    Measure("dysplastic neutrophils", ("hypogranular_neutrophil", "pseudo_pelger"), _NEUTROPHIL_LINEAGE, (
        Tier(10.0, "dysplasia", "≥ 10 % of the neutrophils dysplastic (hypogranular, pseudo-Pelger): the WHO "
                                "threshold for dysplasia of a lineage; also seen in VEXAS"),
    ), "WHO 2022 (Khoury et al., Leukemia 2022); WHO 2016 (Arber et al., Blood 2016)"),
)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (as fractions); ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class DifferentialRow:
    """One line of the differential: a cell type, or a group a threshold applies to.

    ``n`` is the number of cells (annotated types) or their expected number (a cell classifier's
    probabilities summed, :func:`milhema.differential.predicted_differential`); ``percent``,
    ``ci_low`` and ``ci_high`` (percent) are NaN for types left out of the denominator; ``of`` is
    the denominator. ``flag`` and ``meaning`` are empty unless a threshold
    of :data:`MEASURES` is reached; ``below_in_ci`` says the interval reaches below that threshold.
    """

    name: str
    n: float
    of: float
    percent: float
    ci_low: float
    ci_high: float
    group: bool = False
    flag: str = ""
    meaning: str = ""
    threshold: float = math.nan
    below_in_ci: bool = False

    @property
    def counted(self) -> bool:
        return math.isfinite(self.percent)


def _share(name: str, n: int, of: int, group: bool = False) -> DifferentialRow:
    if of <= 0:
        return DifferentialRow(name, n, of, math.nan, math.nan, math.nan, group)
    low, high = wilson_interval(n, of)
    return DifferentialRow(name, n, of, 100.0 * n / of, 100.0 * low, 100.0 * high, group)


def _flagged(row: DifferentialRow, measure: Measure) -> DifferentialRow:
    """``row`` with the highest tier of ``measure`` it reaches (added to a flag it already has)."""
    if row.n < 0.5 or not row.counted:
        return row
    for tier in measure.tiers:
        if row.percent >= tier.at_least:
            if row.flag:
                return replace(row, flag=f"{row.flag}; {tier.flag}", meaning=f"{row.meaning}; {tier.meaning}")
            return replace(row, flag=tier.flag, meaning=tier.meaning, threshold=tier.at_least,
                           below_in_ci=tier.at_least > 0 and row.ci_low < tier.at_least)
    return row


# share(label, types, denominator types (None: all counted), group) -> the row of those cells.
ShareFunction = Callable[[str, tuple[str, ...], "tuple[str, ...] | None", bool], DifferentialRow]


def differential(cell_types: Iterable[str]) -> list[DifferentialRow]:
    """The differential of annotated ``cell_types`` (one name per cell), with Wilson intervals: one
    row per type, most frequent first, then one row per group of :data:`MEASURES` that spans several
    present types or another denominator.
    """
    counts = Counter("" if t is None else str(t) for t in cell_types)
    counted = sum(n for name, n in counts.items() if name not in NOT_COUNTED)

    def share(label: str, types: tuple[str, ...], of_types: tuple[str, ...] | None, group: bool) -> DifferentialRow:
        of = counted if of_types is None else sum(counts.get(t, 0) for t in of_types)
        return _share(label, sum(counts.get(t, 0) for t in types), of, group)

    return differential_table(counts, counted, share)


def differential_table(counts: Mapping[str, float], counted: float, share: ShareFunction) -> list[DifferentialRow]:
    """The rows of a differential from the (expected) number of cells of each type, ``counted`` of
    them in the denominator, and ``share``, which gives a set of types its share and interval (the
    two sources of cell types differ only there). A type is present from half a cell."""
    rows: dict[str, DifferentialRow] = {}
    for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        shown = name or NO_TYPE
        rows[name] = (share(shown, (name,), None, False) if name not in NOT_COUNTED
                      else DifferentialRow(shown, n, counted, math.nan, math.nan, math.nan))
    groups: list[DifferentialRow] = []
    for measure in MEASURES:
        present = tuple(t for t in measure.types if counts.get(t, 0) >= 0.5)
        if not present:
            continue
        if measure.of is None and len(present) == 1:
            rows[present[0]] = _flagged(rows[present[0]], measure)
            continue
        label = f"{measure.name} ({' + '.join(present)})"
        if measure.of == _NEUTROPHIL_LINEAGE:
            label = f"{measure.name} ({' + '.join(present)}), % of neutrophils"
        elif measure.of is not None:
            label = f"{measure.name} ({' + '.join(present)}), % of {' + '.join(measure.of)}"
        groups.append(_flagged(share(label, present, measure.of, True), measure))
    return [*rows.values(), *groups]
