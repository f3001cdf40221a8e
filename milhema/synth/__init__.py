"""Simulated cohorts: patients, CBCs, and rendered blood-smear cells with per-cell truth."""

from milhema.synth.cohort import DIAGNOSES, synthesize_cohort

__all__ = ["DIAGNOSES", "synthesize_cohort"]
