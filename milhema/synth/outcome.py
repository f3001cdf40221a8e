"""Simulated follow-up: months to an event (progression to AML or death) with censoring.

The hazard is exponential with a log hazard ratio built from what a clinician would expect to
matter, so that a model can learn it from the cells and the CBC:

- the diagnosis (AML ≫ MDS > VEXAS > reactive);
- the fraction of diagnostic cells: blasts in AML and MDS, dysplastic or vacuolated cells in MDS
  and VEXAS — visible only in the smear, not in the CBC;
- the number of cytopenias (Hb < 10 g/dL, ANC < 1.8 G/L, platelets < 100 G/L, as in IPSS-R).

Follow-up ends (censoring) at a uniform time between 6 and 60 months, or earlier for a few
patients lost to follow-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from milhema.synth.composition import DiseaseState, blood_blast_fraction

BASE_HAZARD = 0.010   # events per month for a reactive patient without cytopenias
LOG_HR_DIAGNOSIS = {"AML": 1.0, "MDS": 0.6, "VEXAS": 0.4, "reactive": -0.8}
LOG_HR_PER_BLAST = 2.5           # per unit fraction of blasts among white cells
LOG_HR_PER_DIAGNOSTIC = 1.6      # per unit fraction of dysplastic / vacuolated cells (MDS, VEXAS)
LOG_HR_PER_CYTOPENIA = 0.3


def log_hazard_ratio(state: DiseaseState, cbc: Mapping[str, float]) -> float:
    """Log hazard ratio of one patient against :data:`BASE_HAZARD` (missing CBC values count as normal)."""
    lhr = LOG_HR_DIAGNOSIS.get(state.diagnosis, 0.0) + LOG_HR_PER_BLAST * blood_blast_fraction(state)
    if state.diagnosis in ("MDS", "VEXAS"):
        lhr += LOG_HR_PER_DIAGNOSTIC * state.fraction
    cytopenias = sum(1 for key, limit in (("hb", 10.0), ("anc", 1.8), ("plt", 100.0))
                     if not math.isnan(cbc.get(key, math.nan)) and cbc[key] < limit)
    return lhr + LOG_HR_PER_CYTOPENIA * cytopenias


def sample_follow_up(state: DiseaseState, cbc: Mapping[str, float], rng: np.random.Generator) -> tuple[float, int]:
    """(time in months, event 0/1): the earlier of the event and the end of follow-up."""
    hazard = BASE_HAZARD * math.exp(log_hazard_ratio(state, cbc))
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.uniform(6.0, 60.0)
    if rng.random() < 0.1:
        censor_time *= rng.uniform(0.1, 1.0)   # lost to follow-up
    time = max(0.1, round(min(event_time, censor_time), 1))
    return time, int(event_time <= censor_time)
