"""milhema: patient-level diagnosis in hematology by multiple-instance learning.

Data flow (see docs/ARCHITECTURE.md): cohort manifest -> cells (crops or detected on slides)
-> frozen-backbone embedding into HDF5 bags -> MIL models with CBC fusion -> explanations.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("milhema")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
