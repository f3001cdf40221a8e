"""The output type and base class every MIL model shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from milhema.errors import ConfigError
from milhema.models.fusion import CBCFusion


@dataclass
class MILOutput:
    """What every MIL model returns.

    Attributes:
        logits: ``[B, K]`` class logits.
        cell_scores: ``[B, N]`` importance of each cell: >= 0, 0 at padding, summing to 1 over each
            bag's valid cells (all 0 for a bag without cells), so scores compare across models.
        embedding: ``[B, E]`` bag embedding just before the classifier (used by a triplet loss).
        class_cell_scores: ``[B, N, K]`` per-class attention for models with class branches; each
            class column sums to 1 over valid cells.
        view_scores: ``[B, V]`` weight of each view (multi-view models), 0 for missing views.
        survival: raw output of a survival head on ``embedding`` (set by the training wrapper,
            never by a model): ``[B, 1]`` Cox log-risk or ``[B, K]`` discrete-time hazard logits.
        stream_logits: for models with several prediction streams, each trained with its own
            loss (DSMIL: max-instance and bag): their ``[B, K]`` logits. The classification loss
            is then the mean of the streams' losses, and ``logits`` the log of the mean of their
            probabilities (what inference reports).
    """

    logits: Tensor
    cell_scores: Tensor
    embedding: Tensor
    class_cell_scores: Tensor | None = None
    view_scores: Tensor | None = None
    survival: Tensor | None = None
    stream_logits: tuple[Tensor, ...] | None = None


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok`` (constructor argument checks)."""
    if not ok:
        raise ConfigError(message)


def cell_encoder(in_dim: int, hidden_dim: int, dropout: float, widths: Sequence[int] = ()) -> nn.Sequential:
    """The per-cell encoder all models share: Linear -> ReLU -> Dropout, ``[..., D] -> [..., H]``.

    ``widths`` puts more such layers before the last one, ``D -> widths[0] -> ... -> H`` (Ilse et
    al.'s shape for the classic MIL benchmarks is ``widths=(256, 128)``, ``H = 64``)."""
    dims = [in_dim, *widths, hidden_dim]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def normalize_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Zero ``scores [B, N]`` at padding and rescale to sum 1 over valid cells (all-0 rows stay 0)."""
    scores = scores.float().clamp_min(0.0) * mask
    total = scores.sum(dim=1, keepdim=True)
    return scores / torch.where(total > 0, total, torch.ones_like(total))


def masked_max(h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Max over the valid rows of ``h [B, N, H]`` -> ``[B, H]`` (0 for an empty bag), and each row's
    share of the maxima ``[B, N]``: the fraction of the H dimensions it wins, ties split evenly, so
    the shares of a non-empty bag sum to 1 (no gradient: it is a score, not part of the model).

    Rows within a relative 1e-5 of the maximum tie: values that are equal in exact arithmetic but
    were summed in another order (FiLM's shift on cells the encoder zeroed, say) differ in their
    last bits, and the shares must not depend on the order of the cells."""
    filled = h.masked_fill(~mask[..., None], float("-inf"))
    top = filled.amax(dim=1)                                                # [B, H]
    z = torch.where(mask.any(1, keepdim=True), top, torch.zeros_like(top))
    with torch.no_grad():
        gap = (top[:, None, :] - filled).float()                            # >= 0; inf at padding
        won = (gap <= 1e-5 * top.float().abs().clamp_min(1.0)[:, None, :]) & mask[..., None]   # [B, N, H]
        won = won.float() / won.sum(1, keepdim=True).clamp_min(1)
        share = won.mean(-1)
    return z, share


def predicted_class_scores(class_scores: Tensor, logits: Tensor) -> Tensor:
    """The ``[B, N]`` column of ``class_scores [B, N, K]`` belonging to each bag's predicted class."""
    pred = logits.argmax(dim=-1)                                          # [B]
    index = pred[:, None, None].expand(-1, class_scores.shape[1], 1)      # [B, N, 1]
    return class_scores.gather(2, index).squeeze(2)


class MILModel(nn.Module):
    """Base class. Subclasses implement ``forward(x, mask, cbc=None, coords=None, view=None, slide=None) -> MILOutput``.

    ``coords [B, N, 2]`` are level-0 pixels within each cell's own slide, ``view [B, N]`` and
    ``slide [B, N]`` index each cell's view and slide within its bag (a patient bag joins slides:
    coordinates of different slides are not comparable).

    Args:
        in_dim: cell feature dimension D.
        n_classes: number of classes K.
        cbc_dim: width C of the preprocessed CBC vector (0 = no CBC).
        fusion: how the CBC enters the model, one of :data:`~milhema.models.fusion.FUSION_MODES`.
        hidden_dim: width H of the cell encoder.
        dropout: dropout probability (active only in training mode).
        embed_dim: width of the bag embedding handed to ``fusion.bag`` (default ``hidden_dim``);
            set by subclasses, not a user parameter.
        gate_dim: width of the CBC term of gated fusion (default ``hidden_dim``); set by subclasses.

    Class attribute ``test_variants``: parameter sets that take other code paths than the
    defaults (``({"multi_branch": True},)``); the common tests in tests/test_models.py build the
    model with its defaults and with each of these, under every fusion mode.
    """

    test_variants: ClassVar[tuple[dict[str, Any], ...]] = ()

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, embed_dim: int | None = None,
                 gate_dim: int | None = None) -> None:
        super().__init__()
        require(isinstance(in_dim, int) and in_dim >= 1, f"in_dim must be a positive int, got {in_dim!r}")
        require(isinstance(n_classes, int) and n_classes >= 1, f"n_classes must be a positive int, got {n_classes!r}")
        require(isinstance(cbc_dim, int) and cbc_dim >= 0, f"cbc_dim must be an int >= 0, got {cbc_dim!r}")
        require(isinstance(hidden_dim, int) and hidden_dim >= 2, f"hidden_dim must be an int >= 2, got {hidden_dim!r}")
        require(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
                f"dropout must be in [0, 1), got {dropout!r}")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.cbc_dim = cbc_dim
        self.hidden_dim = hidden_dim
        self.dropout = float(dropout)
        self.fusion = CBCFusion(fusion, cbc_dim, embed_dim=embed_dim or hidden_dim, cell_dim=hidden_dim,
                                gate_dim=gate_dim or hidden_dim, dropout=dropout)

    def prepare(self, x: Tensor, mask: Tensor, cbc: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Check shapes; return ``x`` with padding zeroed, ``mask`` as bool and the CBC (None when unused).

        Zeroing padding first means garbage (even NaN) in padded rows can never leak into a result.
        """
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must be [B, N, {self.in_dim}], got {tuple(x.shape)}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        x = x.masked_fill(~mask[..., None], 0.0)
        if not self.fusion.active:
            return x, mask, None
        if cbc is None:
            raise ValueError(f"this model fuses a CBC ({self.fusion.mode!r}) but cbc is None")
        if cbc.shape != (x.shape[0], self.cbc_dim):
            raise ValueError(f"cbc must be [B, {self.cbc_dim}] = [{x.shape[0]}, {self.cbc_dim}], got {tuple(cbc.shape)}")
        return x, mask, cbc.to(x.dtype)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError
