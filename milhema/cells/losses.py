"""Losses of the cell classifier: class-balanced cross-entropy for the types, and a loss for rare
positives for the multi-label anomaly head.

**Why the asymmetric loss (ASL, Ridnik et al., ICCV 2021) is the default for anomalies.** An
anomaly is rare (a few % of cells show vacuoles, a few per mille an Auer rod), so plain binary
cross-entropy is dominated by the many easy negatives and learns to say "no". Focal loss
(Lin et al. 2017) down-weights easy examples with ``(1 - p_t)^gamma``, but symmetrically: the rare
positives, which are hard by nature, lose gradient too. ASL decouples the two sides: positives
keep the full cross-entropy (``gamma_pos = 0``), negatives are down-weighted with ``gamma_neg = 4``
and, below the probability margin ``clip`` (0.05), cost nothing at all, which also discards
negatives that are in truth unlabelled positives (a missed vacuole). Both losses distort the
predicted probabilities, so the anomaly head is recalibrated afterwards (Platt scaling per attribute
on the validation split, :mod:`milhema.cells.fit`): the anomaly rates of the differential count
need calibrated probabilities. ``cells.attribute_loss: focal`` gives the binary focal loss with
``gamma = gamma_neg`` on both sides, for comparison.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(y: np.ndarray, n_types: int) -> torch.Tensor:
    """Inverse-frequency weights ``[T]`` of the types in ``y [M]`` (scikit-learn's "balanced"), so each
    present type weighs as much in the loss; types absent from ``y`` get 0 (they never occur)."""
    counts = np.bincount(np.asarray(y), minlength=n_types).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_types)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(weights, dtype=torch.float32)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05) -> torch.Tensor:
    """Mean ASL over the annotated entries of ``targets [N, A]`` (1, 0; -1 = not annotated, ignored)."""
    mask = targets >= 0
    if not bool(mask.any()):
        return logits.sum() * 0.0
    x, y = logits[mask], targets[mask].float()
    p = torch.sigmoid(x)
    p_neg = (p - clip).clamp(min=0.0) if clip > 0 else p   # shifted: easy negatives give exactly 0
    loss_pos = y * (1 - p).pow(gamma_pos) * F.logsigmoid(x)
    loss_neg = (1 - y) * p_neg.pow(gamma_neg) * torch.log((1 - p_neg).clamp(min=1e-8))
    return -(loss_pos + loss_neg).mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss over the annotated entries of ``targets [N, A]`` (-1 = not annotated)."""
    return asymmetric_loss(logits, targets, gamma_neg=gamma, gamma_pos=gamma, clip=0.0)
