"""Baselines without attention: masked mean pooling and masked max pooling of encoded cells."""

from __future__ import annotations

from torch import Tensor, nn

from milhema.models.base import MILModel, MILOutput, cell_encoder, masked_max, normalize_scores
from milhema.models.registry import register_model


class _PoolingMIL(MILModel):
    """Encoder -> FiLM hook -> pooling -> bag fusion -> linear head. Gated fusion has nothing to gate here."""

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim, dropout=dropout)
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout)
        self.head = nn.Linear(self.fusion.out_dim, n_classes)

    def pool(self, h: Tensor, mask: Tensor, cbc: Tensor | None) -> tuple[Tensor, Tensor]:
        """``h [B, N, H]`` -> bag embedding ``[B, H]`` and raw cell scores ``[B, N]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]`` -> :class:`MILOutput` (coords, view unused)."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        h = self.fusion.cells(self.encoder(x), cbc)
        gate = self.fusion.gate(cbc)
        if gate is not None:
            # "gated" has no attention to condition in a pooling baseline: shift the cell
            # embeddings instead, so the CBC still takes part.
            h = h + gate[:, None, :]
        z, scores = self.pool(h, mask, cbc)
        z = self.fusion.bag(z, cbc)
        return MILOutput(logits=self.head(z), cell_scores=normalize_scores(scores, mask), embedding=z)


@register_model("meanpool")
class MeanPoolMIL(_PoolingMIL):
    """Masked mean of encoded cells; every valid cell scores ``1 / n_valid``."""

    def pool(self, h: Tensor, mask: Tensor, cbc: Tensor | None) -> tuple[Tensor, Tensor]:
        m = mask.to(h.dtype)
        z = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        return z, m


@register_model("maxpool")
class MaxPoolMIL(_PoolingMIL):
    """Masked max of encoded cells (empty bag -> 0).

    A cell's score is the share of embedding dimensions in which it is the maximum, ties split
    evenly, i.e. how much of the bag embedding it alone determines.
    """

    def pool(self, h: Tensor, mask: Tensor, cbc: Tensor | None) -> tuple[Tensor, Tensor]:
        return masked_max(h, mask)
