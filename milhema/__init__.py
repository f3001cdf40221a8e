"""milhema: patient-level diagnosis in hematology by multiple-instance learning.

Data flow (see docs/ARCHITECTURE.md): cohort manifest -> cells (crops or detected on slides)
-> frozen-backbone embedding into HDF5 bags -> MIL models with CBC fusion -> explanations.

``milhema.load_run(path)`` opens a finished run for predictions from Python (:mod:`milhema.api`).
"""

from __future__ import annotations

from typing import Any

from milhema.version import __version__

__all__ = ["__version__", "load_run"]


def __getattr__(name: str) -> Any:
    # The notebook API loads torch: imported on first use, so `milhema --help` and the
    # file-format modules start without it.
    if name == "load_run":
        from milhema.api import load_run

        return load_run
    raise AttributeError(f"module 'milhema' has no attribute {name!r}")
