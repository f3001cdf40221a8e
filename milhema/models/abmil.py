"""Attention-based MIL (Ilse et al. 2018), optionally with one attention branch per class.

``multi_branch=True`` follows CLAM-MB (Lu et al. 2021) / SCEMILA (Hehr et al. 2023): each class
has its own attention map, its own bag embedding and its own logit, so every class can point at
different cells (e.g. blasts for AML, dysplastic neutrophils for MDS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from milhema.models.attention import GatedAttention
from milhema.models.base import MILModel, MILOutput, cell_encoder, predicted_class_scores, require
from milhema.models.registry import register_model


@register_model("abmil")
class ABMIL(MILModel):
    """Encoder -> FiLM hook -> gated attention (CBC-conditioned when gated) -> weighted sum -> bag fusion -> head.

    Args (beyond :class:`MILModel`'s):
        attn_dim: hidden width of the attention network (default ``hidden_dim // 2``).
        multi_branch: one attention branch and one linear classifier per class.
        encoder_widths: widths of further cell-encoder layers before the one of width
            ``hidden_dim`` (default none: one layer). ``[256, 128]`` with ``hidden_dim: 64`` is the
            shape of the instance network Ilse et al. describe for the classic MIL benchmarks
            (three fully connected layers before the attention).

    Outputs: ``embedding`` is ``[B, F]`` (``F = fusion.out_dim``), or ``[B, K * F]`` with
    ``multi_branch`` (the class-wise embeddings flattened); ``class_cell_scores`` ``[B, N, K]``
    only with ``multi_branch``, where ``cell_scores`` is the predicted class's branch.
    """

    test_variants = ({"multi_branch": True}, {"encoder_widths": (8, 6)})

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, attn_dim: int | None = None,
                 multi_branch: bool = False, encoder_widths: Sequence[int] | None = None) -> None:
        attn_dim = attn_dim if attn_dim is not None else max(1, hidden_dim // 2)
        require(isinstance(attn_dim, int) and attn_dim >= 1, f"attn_dim must be a positive int, got {attn_dim!r}")
        widths = list(encoder_widths or [])
        require(all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths),
                f"encoder_widths must be a list of positive ints, got {encoder_widths!r}")
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim,
                         dropout=dropout, gate_dim=attn_dim)
        self.multi_branch = bool(multi_branch)
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout, widths)
        n_branches = n_classes if self.multi_branch else 1
        self.attention = GatedAttention(hidden_dim, attn_dim, n_branches, cond_dim=self.fusion.gate_out_dim)
        if self.multi_branch:
            # A separate linear classifier per class, each reading only its own class's embedding.
            self.heads = nn.ModuleList(nn.Linear(self.fusion.out_dim, 1) for _ in range(n_classes))
        else:
            self.head = nn.Linear(self.fusion.out_dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]`` -> :class:`MILOutput` (coords, view unused)."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        h = self.fusion.cells(self.encoder(x), cbc)                             # [B, N, H]
        weights = self.attention(h, mask, self.fusion.gate(cbc))               # [B, N, n_branches]
        z = torch.einsum("bnk,bnh->bkh", weights.to(h.dtype), h)                # [B, n_branches, H]
        if not self.multi_branch:
            emb = self.fusion.bag(z[:, 0], cbc)
            return MILOutput(logits=self.head(emb), cell_scores=weights[..., 0], embedding=emb)
        b, k, _ = z.shape
        cbc_k = None if cbc is None else cbc.repeat_interleave(k, dim=0)
        emb = self.fusion.bag(z.reshape(b * k, -1), cbc_k).reshape(b, k, -1)   # [B, K, F]
        logits = torch.cat([head(emb[:, i]) for i, head in enumerate(self.heads)], dim=-1)
        return MILOutput(logits=logits, cell_scores=predicted_class_scores(weights, logits),
                         embedding=emb.flatten(1), class_cell_scores=weights)
