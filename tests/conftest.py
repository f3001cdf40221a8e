"""Shared fixtures. Tests make their own small data; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests write real offline W&B runs into temporary folders and never send anything.
os.environ["WANDB_MODE"] = "offline"


@pytest.fixture(scope="session", autouse=True)
def private_tracking_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the pseudonymisation salt and W&B's own settings, cache and staging out of the home folder."""
    root = tmp_path_factory.mktemp("tracking")
    os.environ["MILHEMA_SALT_FILE"] = str(root / "salt")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[name] = str(root / name.lower())
    return root


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated cohort of 8 patients (2 per class) with ~16 small crops per slide."""
    from milhema.synth import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort") / "tiny"
    return synthesize_cohort(out, n_patients=8, seed=11, cells_per_slide=16, crop_px=64, workers=1, progress=False)
