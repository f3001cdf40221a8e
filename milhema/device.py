"""Choosing the torch device for embedding, training and prediction."""

from __future__ import annotations

import torch

from milhema.errors import MilhemaError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        MilhemaError: an unknown device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise MilhemaError(f"device {name!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MilhemaError(f"device {name}: no CUDA GPU is available here (use cpu)")
    return resolved
