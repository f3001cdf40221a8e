"""``transformer``: a class-token transformer over a patient's cells (alias ``transmil``).

It is *not* TransMIL (Shao et al. 2021), though it is often asked for under that name and keeps
it as an alias: TransMIL arranges patch tokens on a square grid for its PPEG positional module
and uses Nyström approximate attention. Blood-smear cells have no grid and no meaningful order,
so this model uses exact multi-head self-attention without any positional encoding, which makes
it invariant to the order of the cells (bags of a few hundred cells keep exact attention cheap).
What it shares with TransMIL: a class token that reads the bag, and pre-norm transformer layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from milhema.models.base import MILModel, MILOutput, cell_encoder, normalize_scores, require
from milhema.models.registry import register_model


class _Block(nn.Module):
    """Pre-norm transformer layer: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding: Tensor, queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``x [B, L, H]``, ``padding [B, L]`` (True = ignore) -> ``x' [B, Q, H]``, attention.

        With ``queries=None`` every token attends (Q = L, no weights returned). With ``queries=q``
        only the first q tokens are updated and their head-averaged attention ``[B, q, L]`` is
        returned: the last layer needs only the class token, so it costs O(L) instead of O(L²).
        """
        y = self.norm1(x)
        q = y if queries is None else y[:, :queries]
        out, weights = self.attn(q, y, y, key_padding_mask=padding, need_weights=queries is not None,
                                 average_attn_weights=True)
        x = (x if queries is None else x[:, :queries]) + self.drop(out)
        return x + self.drop(self.mlp(self.norm2(x))), weights


@register_model("transformer", aliases=("transmil",))
class ClassTokenTransformer(MILModel):
    """Encoder -> FiLM hook -> [class token; cells] -> pre-norm transformer -> class token -> bag fusion -> head.

    Args (beyond :class:`MILModel`'s):
        n_layers: number of transformer layers.
        n_heads: attention heads (must divide ``hidden_dim``).

    Gated fusion adds a CBC projection to the class token, so the CBC shapes the query that reads
    the cells. ``cell_scores`` is the class token's attention to the cells in the last layer,
    averaged over heads and renormalised over valid cells.
    """

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, n_layers: int = 2, n_heads: int = 4) -> None:
        require(isinstance(n_layers, int) and n_layers >= 1, f"n_layers must be a positive int, got {n_layers!r}")
        require(isinstance(n_heads, int) and n_heads >= 1 and hidden_dim % n_heads == 0,
                f"n_heads must be a positive int dividing hidden_dim={hidden_dim}, got {n_heads!r}")
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim, dropout=dropout)
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(hidden_dim, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(self.fusion.out_dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]`` -> :class:`MILOutput` (coords, view unused)."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        h = self.fusion.cells(self.encoder(x), cbc)                               # [B, N, H]
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        gate = self.fusion.gate(cbc)
        if gate is not None:
            cls = cls + gate[:, None, :]
        seq = torch.cat([cls.to(h.dtype), h], dim=1)                              # [B, 1 + N, H]
        # The class token is never padding, so no attention row is fully masked (no NaN for empty bags).
        padding = torch.cat([mask.new_zeros(mask.shape[0], 1), ~mask], dim=1)
        for block in self.blocks[:-1]:
            seq, _ = block(seq, padding)
        # Only the class token is read out of the last layer.
        seq, weights = self.blocks[-1](seq, padding, queries=1)
        assert weights is not None
        emb = self.fusion.bag(self.norm(seq[:, 0]), cbc)
        scores = normalize_scores(weights[:, 0, 1:], mask)
        return MILOutput(logits=self.head(emb), cell_scores=scores, embedding=emb)
