"""Cohort-level data: the manifest (patients.csv, slides.csv) and its validation."""

from milhema.data.manifest import Cohort, Patient, Slide, load_cohort

__all__ = ["Cohort", "Patient", "Slide", "load_cohort"]
