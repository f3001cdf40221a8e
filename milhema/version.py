"""The installed milhema version, recorded in bags, checkpoints and simulated cohorts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("milhema")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
