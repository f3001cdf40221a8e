"""Multi-view MIL: attention-pool the cells of each view, then pool the views.

A view is any grouping of a patient's cells: the slides/smears of a patient, the specimen type
(peripheral blood vs bone marrow), or cell-type groups. Views are pooled by an element-wise max
(as MVCNN, Su et al. 2015) or by gated attention. A view without cells is missing and is ignored,
so a patient with only some views still gets a prediction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from milhema.models.attention import GatedAttention, masked_softmax
from milhema.models.base import MILModel, MILOutput, cell_encoder, masked_max, normalize_scores, require
from milhema.models.registry import register_model

VIEW_POOLS = ("max", "attention")


@register_model("multiview")
class MultiViewMIL(MILModel):
    """Encoder -> FiLM hook -> per-view gated attention -> view pooling -> bag fusion -> head.

    Args (beyond :class:`MILModel`'s):
        n_views: number of views V; ``view`` ids must lie in ``[0, V)``.
        view_pool: ``"max"`` or ``"attention"``.
        attn_dim: hidden width of the attention networks (default ``hidden_dim // 2``).

    The cell-level attention network is shared by all views (views of one kind, such as
    repeated smears, look alike). ``view_scores [B, V]``: attention over present views, or for
    max pooling the share of embedding dimensions each view wins (ties split); 0 for missing
    views. ``cell_scores`` = within-view attention x its view's score, renormalised.
    """

    test_variants = ({"view_pool": "attention"},)

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, n_views: int = 2, view_pool: str = "max",
                 attn_dim: int | None = None) -> None:
        attn_dim = attn_dim if attn_dim is not None else max(1, hidden_dim // 2)
        require(isinstance(n_views, int) and n_views >= 1, f"n_views must be a positive int, got {n_views!r}")
        require(view_pool in VIEW_POOLS, f"view_pool must be one of {', '.join(VIEW_POOLS)}, got {view_pool!r}")
        require(isinstance(attn_dim, int) and attn_dim >= 1, f"attn_dim must be a positive int, got {attn_dim!r}")
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim,
                         dropout=dropout, gate_dim=attn_dim)
        self.n_views = n_views
        self.view_pool = view_pool
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout)
        self.cell_attention = GatedAttention(hidden_dim, attn_dim, cond_dim=self.fusion.gate_out_dim)
        if view_pool == "attention":
            self.view_attention = GatedAttention(hidden_dim, attn_dim, cond_dim=self.fusion.gate_out_dim)
        self.head = nn.Linear(self.fusion.out_dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]``, ``view [B, N]`` long (None = all view 0)."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        if view is None:
            view = torch.zeros_like(mask, dtype=torch.long)
        elif view.shape != mask.shape:
            raise ValueError(f"view must be [B, N] = {tuple(mask.shape)}, got {tuple(view.shape)}")
        valid_view = view[mask]
        if valid_view.numel() and (int(valid_view.min()) < 0 or int(valid_view.max()) >= self.n_views):
            raise ValueError(f"view ids must lie in [0, {self.n_views}), got {valid_view.min()}..{valid_view.max()}")
        h = self.fusion.cells(self.encoder(x), cbc)                                 # [B, N, H]
        gate = self.fusion.gate(cbc)
        cond = None if gate is None else gate[:, None, :]

        views = torch.arange(self.n_views, device=view.device)
        in_view = mask[..., None] & (view[..., None] == views)                      # [B, N, V]
        logits = self.cell_attention.logits(h, cond)                                # [B, N, 1]
        cell_w = masked_softmax(logits.expand_as(in_view), in_view, dim=1)         # [B, N, V]
        view_emb = torch.einsum("bnv,bnh->bvh", cell_w.to(h.dtype), h)              # [B, V, H]
        present = in_view.any(dim=1)                                                # [B, V]

        if self.view_pool == "attention":
            view_w = masked_softmax(self.view_attention.logits(view_emb, cond)[..., 0], present, dim=1)
            z = torch.einsum("bv,bvh->bh", view_w.to(h.dtype), view_emb)
        else:
            z, view_w = masked_max(view_emb, present)                               # [B, H], [B, V]

        emb = self.fusion.bag(z, cbc)
        scores = normalize_scores(torch.einsum("bnv,bv->bn", cell_w, view_w.float()), mask)
        return MILOutput(logits=self.head(emb), cell_scores=scores, embedding=emb, view_scores=view_w)
