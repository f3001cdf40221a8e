"""Input preprocessing fitted on training patients only and stored in the model's state.

Keeping the fitted statistics as buffers of the model means a checkpoint carries everything
needed to predict: the same log transform, standardisation and imputation are applied at
training and at prediction time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn


class FeatureNorm(nn.Module):
    """Per-feature standardisation of cell features ``[..., D]`` (identity when not fitted/enabled)."""

    mean: Tensor
    std: Tensor

    def __init__(self, dim: int, enabled: bool = True) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.enabled = enabled

    def fit(self, blocks: Iterable[np.ndarray]) -> FeatureNorm:
        """Statistics over all rows of ``blocks`` (each ``[n_i, D]``), accumulated in float64."""
        dim = self.mean.numel()
        total = np.zeros(dim)
        square = np.zeros(dim)
        n = 0
        for block in blocks:
            values = np.asarray(block, dtype=np.float64)
            total += values.sum(axis=0)
            square += (values * values).sum(axis=0)
            n += len(values)
        if n:
            mean = total / n
            std = np.sqrt(np.maximum(square / n - mean * mean, 0.0))
            std[std < 1e-6] = 1.0  # constant features stay as they are instead of exploding
            self.mean.copy_(torch.from_numpy(mean))
            self.std.copy_(torch.from_numpy(std))
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std


class CBCEncoder(nn.Module):
    """Raw CBC ``[B, C]`` (NaN = missing) -> ``[B, 2C]``: standardised values then missing indicators.

    Counts named in ``log_columns`` are log(1 + x) first; missing values become 0 after
    standardisation (the training mean) and their indicator 1, so the model can tell
    "normal" from "not measured".
    """

    log_mask: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, columns: Sequence[str], log_columns: Sequence[str] = ()) -> None:
        super().__init__()
        self.columns = list(columns)
        self.register_buffer("log_mask", torch.tensor([c in log_columns for c in self.columns], dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(len(self.columns)))
        self.register_buffer("std", torch.ones(len(self.columns)))

    @property
    def out_dim(self) -> int:
        return 2 * len(self.columns)

    def _transform(self, raw: Tensor) -> Tensor:
        return torch.where(self.log_mask, torch.log1p(raw.clamp_min(0)), raw)

    def fit(self, raw: np.ndarray) -> CBCEncoder:
        """Mean and sd per column over the training patients' observed values."""
        values = self._transform(torch.as_tensor(raw, dtype=torch.float32)).numpy()
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=0) if len(values) else np.zeros(len(self.columns))
            std = np.nanstd(values, axis=0) if len(values) else np.ones(len(self.columns))
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        return self

    def forward(self, raw: Tensor) -> Tensor:
        z = (self._transform(raw) - self.mean) / self.std
        missing = torch.isnan(z)
        return torch.cat([torch.where(missing, torch.zeros_like(z), z), missing.to(z.dtype)], dim=-1)
