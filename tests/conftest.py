"""Shared fixtures. Tests make their own small data; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated cohort of 8 patients (2 per class) with ~16 small crops per slide."""
    from milhema.synth import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort") / "tiny"
    return synthesize_cohort(out, n_patients=8, seed=11, cells_per_slide=16, crop_px=64, workers=1, progress=False)
