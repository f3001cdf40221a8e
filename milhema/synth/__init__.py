"""Simulated cohorts: patients, CBCs, follow-up, and blood smears rendered as single-cell crops or
whole-slide scans (pyramidal TIFF), with per-cell truth (see docs/SIMULATION.md)."""

from milhema.synth.cohort import DIAGNOSES, synthesize_cohort

__all__ = ["DIAGNOSES", "synthesize_cohort"]
