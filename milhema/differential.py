"""The differential count from a cell classifier's probabilities, with intervals (docs/DOMAIN.md).

A bag predicted by ``milhema cells predict`` holds, for each of its N cells, the calibrated
probabilities ``p[i, t]`` of the T cell types. The count of type t is estimated by its expected
value ``E_t = sum_i p[i, t]`` and the percentage by ``100 E_t / N``. Its 95 % interval, for the
patient's true proportion ``pi_t`` of type t in the blood, combines two uncertainties:

* **the classifier's**: given the cells, the true count ``C_t`` is a sum of independent Bernoulli
  variables of probabilities ``p[i, t]`` (the probabilities are calibrated), a **Poisson-binomial**
  variable of mean ``E_t`` and variance ``V_t = sum_i p[i, t] (1 - p[i, t])``;
* **the sampling of cells**: the N cells are a sample of the patient's blood, so given ``pi_t`` the
  count is binomial, ``C_t ~ Bin(N, pi_t)``.

The interval adds the two: given ``C_t = c`` the proportion is bounded by Jeffreys' interval,
``pi_t | c ~ Beta(c + 1/2, N - c + 1/2)``; ``c`` is unknown with the Poisson-binomial distribution
above, so ``pi_t`` follows the mixture ``sum_c P(C_t = c) Beta(c + 1/2, N - c + 1/2)``, whose 2.5 %
and 97.5 % quantiles are the interval (with Jeffreys' convention that it starts at 0 when the
count may well be 0, ``P(C_t = 0) >= 2.5 %``). By the law of total variance its variance is
``pi_t (1 - pi_t) / N + V_t / N^2``: sampling plus classifier. It stays in [0, 100] without the
normal approximation, which fails exactly where it matters (a few blasts among 200 cells: none
seen still allows ~1.2 %), and a perfect classifier (every ``p`` 0 or 1) gives Jeffreys'
binomial interval of the count itself.

Adding the variances is conservative when the probabilities are calibrated *for this patient*:
then ``E_t`` is the conditional mean of ``C_t`` given the cells, their difference is negatively
correlated with the sampling error (``Cov = -V_t / N^2``), and ``Var(E_t / N - pi_t)`` is only
``pi_t (1 - pi_t) / N - V_t / N^2``. But the probabilities are calibrated on the training
population, not on each patient: a patient whose blasts are ten times more common than in
training has its ambiguous cells pulled towards the training mix, an error of this patient's
cells that does not average out and that the Poisson-binomial term stands for. The interval
claims no more than what held-out patients show: ``milhema cells train`` reports how often their
intervals hold their annotated percentages (``coverage_95`` in metrics.json).

Anomaly rates among neutrophils use the same interval: the expected number of neutrophils is
``W = sum_i w_i`` (``w_i``: the probability that cell i is one of the neutrophil types), the
count of neutrophils showing an attribute is Poisson-binomial with probabilities ``w_i a_i``
(``a_i`` the anomaly head's probability, taken as independent of the type given the cell), and
``W`` stands for N. Treating ``W`` as known is an approximation when few cells are neutrophils
(the interval is then wide anyway).

Both rest on the cells' errors being independent: errors shared by the cells of one slide (a
stain the classifier has not seen) are not in the interval.

The predicted differential can be a model input: ``data.patient_features`` may list
``diff_<type>`` (percent of the patient's cells, all slides pooled) and ``anomaly_<attribute>``
(percent of the patient's neutrophils): :func:`with_differential` computes them from the bags.
The cell classifier is trained on cell annotations, never on diagnoses, so these values carry
no diagnosis label across cv folds (see docs/ARCHITECTURE.md for the annotation caveat).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta as beta_dist

from milhema.bags import CellPredictions, read_cell_predictions
from milhema.data.differential import NOT_COUNTED, DifferentialRow, differential_table
from milhema.data.manifest import DERIVED_PREFIXES, Cohort, is_derived_feature
from milhema.errors import BagError, MilhemaError, did_you_mean

DIFF_PREFIX, ANOMALY_PREFIX = DERIVED_PREFIXES
DIFFERENTIAL_HEADER = ("patient_id", "slide_id", "type", "n_cells", "n_expected", "percent", "ci_low", "ci_high")
ANOMALY_HEADER = ("patient_id", "slide_id", "attribute", "n_neutrophils", "n_expected", "percent", "ci_low", "ci_high")


@dataclass(frozen=True)
class Estimate:
    """A percentage with its 95 % interval: ``expected`` of ``n`` (expected) cells; NaN when ``n`` is 0."""

    n: float
    expected: float
    percent: float
    low: float
    high: float


def poisson_binomial(p: np.ndarray) -> np.ndarray:
    """The distribution ``[K, N + 1]`` of the number of successes of N independent trials, for each row of
    success probabilities ``p [K, N]`` (exact, by adding one trial at a time)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0).reshape(len(p), -1)
    pmf = np.zeros((len(p), p.shape[1] + 1))
    pmf[:, 0] = 1.0
    for i in range(p.shape[1]):
        q = p[:, i:i + 1]
        pmf[:, 1:i + 2] = pmf[:, 1:i + 2] * (1 - q) + pmf[:, :i + 1] * q
        pmf[:, 0] *= 1 - q[:, 0]
    return pmf


def estimate(probs: np.ndarray, n: float, level: float = 0.95) -> Estimate:
    """The percentage ``100 sum(probs) / n`` of ``n`` cells whose probabilities of being counted are
    ``probs [N]``, with the interval of the module docstring (NaN when ``n`` is 0)."""
    probs = np.asarray(probs, np.float64).reshape(-1)
    expected = float(probs.sum())
    if n <= 0:
        return Estimate(float(n), expected, math.nan, math.nan, math.nan)
    return _interval(poisson_binomial(probs[None])[0], expected, float(n), level)


def _interval(pmf: np.ndarray, expected: float, n: float, level: float) -> Estimate:
    """Quantiles of the mixture over counts ``c`` (weights ``pmf``) of Beta(c + 1/2, n - c + 1/2)."""
    counts = np.flatnonzero(pmf > 1e-12)
    weights = pmf[counts] / pmf[counts].sum()
    a, b = counts + 0.5, np.maximum(n - counts, 0.0) + 0.5

    def cdf(x: float) -> float:
        return float(weights @ beta_dist.cdf(x, a, b))

    tail = (1 - level) / 2
    # Jeffreys' convention: a count that may well be 0 (or all n) has its interval start at 0 (end at 1).
    low = 0.0 if pmf[0] >= tail or cdf(1e-12) >= tail else brentq(lambda x: cdf(x) - tail, 1e-12, 1.0, xtol=1e-7)
    high = 1.0 if (float(n).is_integer() and len(pmf) > n and pmf[int(n)] >= tail) or cdf(1 - 1e-12) <= 1 - tail else brentq(lambda x: cdf(x) - (1 - tail), 1e-12, 1 - 1e-12, xtol=1e-7)
    return Estimate(n, expected, 100 * min(expected / n, 1.0), 100 * low, 100 * high)


def cell_differential(type_probs: np.ndarray, level: float = 0.95) -> list[Estimate]:
    """One :class:`Estimate` per column of ``type_probs [N, T]``: the percentage of each type among N cells."""
    probs = np.asarray(type_probs, np.float64).reshape(len(type_probs), -1)
    n = len(probs)
    if n == 0:
        return [Estimate(0.0, 0.0, math.nan, math.nan, math.nan) for _ in range(probs.shape[1])]
    pmfs = poisson_binomial(probs.T)
    return [_interval(pmf, float(e), n, level) for pmf, e in zip(pmfs, probs.sum(axis=0), strict=True)]


def type_estimates(type_names: Sequence[str], type_probs: np.ndarray, level: float = 0.95) -> list[Estimate]:
    """One :class:`Estimate` per type, as a differential reports them: a counted type in percent of
    the (expected) counted white cells, a type a differential does not count (``smudge``, see
    :data:`milhema.data.differential.NOT_COUNTED`) in percent of all N cells. Each estimate's ``n``
    is its denominator."""
    probs = np.asarray(type_probs, np.float64).reshape(len(type_probs), len(type_names))
    counted = [i for i, t in enumerate(type_names) if t not in NOT_COUNTED]
    if len(counted) == len(type_names) or not counted:
        return cell_differential(probs, level)
    of = float(probs[:, counted].sum())
    return [estimate(probs[:, i], of if t not in NOT_COUNTED else float(len(probs)), level)
            for i, t in enumerate(type_names)]


def anomaly_rates(type_probs: np.ndarray, attribute_probs: np.ndarray, neutrophils: Sequence[int]) -> list[Estimate]:
    """One :class:`Estimate` per column of ``attribute_probs [N, A]``: the percentage of neutrophils (the
    ``neutrophils`` columns of ``type_probs [N, T]``) that show it; NaN when no type is a neutrophil."""
    w = np.asarray(type_probs, np.float64)[:, list(neutrophils)].sum(axis=1) if len(neutrophils) else None
    out = []
    for column in np.asarray(attribute_probs, np.float64).T:
        if w is None:
            out.append(Estimate(0.0, math.nan, math.nan, math.nan, math.nan))
            continue
        out.append(estimate(w * column, float(w.sum())))
    return out


def predicted_differential(type_names: Sequence[str], type_probs: np.ndarray) -> list[DifferentialRow]:
    """The differential table of the report (:func:`milhema.data.differential.differential_table`:
    types, groups, WHO / ICC flags) from a classifier's probabilities ``type_probs [N, T]`` of the
    ``type_names``: expected counts, and the intervals of this module (sampling + classifier).

    Types not counted in a differential (``smudge`` ...) are left out of the denominator by their
    probability: the denominator is the expected number of counted cells.
    """
    probs = np.asarray(type_probs, np.float64).reshape(len(type_probs), len(type_names))
    column = {str(t): i for i, t in enumerate(type_names)}
    counts = {t: float(probs[:, i].sum()) for t, i in column.items()}
    counted = float(probs[:, [i for t, i in column.items() if t not in NOT_COUNTED]].sum())

    def share(label: str, types: tuple[str, ...], of_types: tuple[str, ...] | None, group: bool) -> DifferentialRow:
        p = probs[:, [column[t] for t in types if t in column]].sum(axis=1)
        of = counted if of_types is None else float(probs[:, [column[t] for t in of_types if t in column]].sum())
        est = estimate(p, of)
        return DifferentialRow(label, est.expected, of, est.percent, est.low, est.high, group)

    return differential_table(counts, counted, share)


def pooled_predictions(slides: Sequence[SlidePredictions]) -> tuple[tuple[str, ...], np.ndarray]:
    """The type names and the probabilities ``[N, T]`` of all the cells of ``slides`` (one classifier)."""
    return tuple(slides[0].predictions.type_names), _pooled(slides)[0]


@dataclass(frozen=True)
class SlidePredictions:
    """The predictions of one slide's bag, with the neutrophil types its classifier names."""

    slide_id: str
    patient_id: str
    predictions: CellPredictions
    neutrophil_types: tuple[str, ...]

    @property
    def neutrophil_columns(self) -> list[int]:
        return [i for i, t in enumerate(self.predictions.type_names) if t in self.neutrophil_types]


def read_slide_predictions(cohort: Cohort, bags: Path | None, patient_ids: Sequence[str], *,
                           required: bool) -> dict[str, list[SlidePredictions]]:
    """The predictions of every slide of ``patient_ids`` (patient -> slides in manifest order).

    One classifier must have predicted them all (the same fingerprint, types and attributes).
    With ``required`` a slide without predictions is refused; otherwise it is left out (and so
    is its patient's pooled row: :func:`differential_rows`).

    Raises:
        BagError: a bag without predictions (``required``), or bags of different classifiers.
    """
    out: dict[str, list[SlidePredictions]] = {}
    first: SlidePredictions | None = None
    for pid in patient_ids:
        for slide in cohort.slides_of(pid):
            found = read_cell_predictions(slide.bag_path(bags))
            if found is None:
                if required:
                    raise BagError(f"slide {slide.slide_id}: its bag has no cell_type_probs, which the differential "
                                   "patient features need; run milhema cells predict --run CELL_RUN --bags "
                                   f"{bags or 'BAGS'} first")
                continue
            here = slide_predictions(slide.slide_id, pid, found)
            first = first or here
            _same_classifier(first, here)
            out.setdefault(pid, []).append(here)
    return out


def slide_predictions(slide_id: str, patient_id: str, found: CellPredictions) -> SlidePredictions:
    """One slide's predictions with the neutrophil types its classifier recorded (``cell_classifier`` JSON)."""
    return SlidePredictions(slide_id, patient_id, found, _neutrophil_types(found))


def _neutrophil_types(found: CellPredictions) -> tuple[str, ...]:
    try:
        info = json.loads(found.info)
    except ValueError:
        info = {}
    listed = info.get("neutrophil_types", []) if isinstance(info, dict) else []
    return tuple(str(t) for t in listed) if isinstance(listed, list) else ()


def _same_classifier(a: SlidePredictions, b: SlidePredictions) -> None:
    pa, pb = a.predictions, b.predictions
    if (pa.classifier_sha256, pa.type_names, pa.attribute_names) != (pb.classifier_sha256, pb.type_names,
                                                                       pb.attribute_names):
        raise BagError(f"slides {a.slide_id} and {b.slide_id} were predicted by different cell classifiers "
                       f"({pa.classifier_sha256[:12]} and {pb.classifier_sha256[:12]}); run milhema cells predict "
                       "with one run on all the bags")


def _pooled(slides: Sequence[SlidePredictions]) -> tuple[np.ndarray, np.ndarray | None]:
    types = np.concatenate([s.predictions.type_probs for s in slides])
    attributes = [s.predictions.attribute_probs for s in slides]
    return types, None if any(a is None for a in attributes) else np.concatenate(
        [a for a in attributes if a is not None])


def differential_rows(found: dict[str, list[SlidePredictions]], cohort: Cohort,
                      ) -> tuple[list[list[object]], list[list[object]]]:
    """Rows of differential.csv and anomalies.csv (:data:`DIFFERENTIAL_HEADER`, :data:`ANOMALY_HEADER`):
    per patient (``slide_id`` empty: all its slides pooled, only when every slide has predictions) then
    per slide, numbers rounded for reading."""
    diff: list[list[object]] = []
    anomalies: list[list[object]] = []
    for pid, slides in found.items():
        groups: list[tuple[str, Sequence[SlidePredictions]]] = [(s.slide_id, [s]) for s in slides]
        if len(slides) == len(cohort.slides_of(pid)):
            groups.insert(0, ("", slides))
        for slide_id, group in groups:
            types, attributes = _pooled(group)
            pred = group[0].predictions
            for name, est in zip(pred.type_names, type_estimates(pred.type_names, types), strict=True):
                diff.append([pid, slide_id, name, *_cells(est)])
            if attributes is not None:
                rates = anomaly_rates(types, attributes, group[0].neutrophil_columns)
                for name, est in zip(pred.attribute_names, rates, strict=True):
                    anomalies.append([pid, slide_id, name, *_cells(est)])
    return diff, anomalies


def _cells(est: Estimate) -> list[object]:
    def fmt(value: float, digits: int) -> str:
        return "" if math.isnan(value) else f"{value:.{digits}f}"

    n = str(int(est.n)) if float(est.n).is_integer() else fmt(est.n, 2)
    return [n, fmt(est.expected, 2), fmt(est.percent, 2), fmt(est.low, 2), fmt(est.high, 2)]


def patient_values(slides: Sequence[SlidePredictions]) -> dict[str, float]:
    """``diff_<type>`` and ``anomaly_<attribute>`` percentages of one patient, all slides pooled (NaN without cells)."""
    types, attributes = _pooled(slides)
    pred = slides[0].predictions
    values = {f"{DIFF_PREFIX}{name}": est.percent
              for name, est in zip(pred.type_names, type_estimates(pred.type_names, types), strict=True)}
    if attributes is not None:
        rates = anomaly_rates(types, attributes, slides[0].neutrophil_columns)
        values |= {f"{ANOMALY_PREFIX}{name}": est.percent for name, est in zip(pred.attribute_names, rates,
                                                                               strict=True)}
    return values


def with_differential(cohort: Cohort, bags: Path | None, patient_ids: Sequence[str]) -> tuple[Cohort, str | None]:
    """The cohort with its derived patient features (``diff_*``, ``anomaly_*`` of ``data.patient_features``)
    computed from the bags of ``patient_ids``, and the fingerprint of the classifier that predicted them.

    Returns ``(cohort, None)`` unchanged when no derived feature is asked for. A patient without
    slides, or without cells, gets NaN (a missing value, imputed as a missing CBC value is).

    Raises:
        MilhemaError: a bag without predictions, bags of different classifiers, or a feature naming
            a type or attribute the classifier does not predict.
    """
    derived = [c for c in cohort.patient_features if is_derived_feature(c)]
    if not derived:
        return cohort, None
    found = read_slide_predictions(cohort, bags, patient_ids, required=True)
    if not found:
        return cohort, None
    example = next(iter(found.values()))[0]
    known = [f"{DIFF_PREFIX}{t}" for t in example.predictions.type_names] + [
        f"{ANOMALY_PREFIX}{a}" for a in example.predictions.attribute_names]
    unknown = [c for c in derived if c not in known]
    if unknown:
        raise MilhemaError(f"data.patient_features names {unknown[0]!r}, which the bags' cell classifier does not "
                           f"predict{did_you_mean(unknown[0], known)}; it predicts {', '.join(known)}")
    patients = dict(cohort.patients)
    for pid, slides in found.items():
        values = patient_values(slides)
        patients[pid] = dataclasses.replace(patients[pid], values={**patients[pid].values,
                                                                   **{c: values[c] for c in derived}})
    return dataclasses.replace(cohort, patients=patients), example.predictions.classifier_sha256


def differential_columns(cohort: Cohort, bags: Path | None, patient_ids: Sequence[str]) -> dict[str, list[float]]:
    """The predicted differential of each of ``patient_ids`` as table columns (``diff_<type>``,
    ``anomaly_<attribute>`` in percent, NaN for a patient without predictions on every slide), for the
    tracker's predictions table; ``{}`` when no bag carries a cell classifier's predictions."""
    try:
        found = read_slide_predictions(cohort, bags, patient_ids, required=False)
    except MilhemaError:   # bags of different classifiers: the table shows no differential
        return {}
    values = {pid: patient_values(slides) for pid, slides in found.items()
              if len(slides) == len(cohort.slides_of(pid))}
    names = list(dict.fromkeys(name for v in values.values() for name in v))
    return {name: [values.get(pid, {}).get(name, math.nan) for pid in patient_ids] for name in names}
