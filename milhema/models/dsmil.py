"""Dual-stream MIL (Li, Li & Eliceiri 2021, DSMIL).

Stream 1 scores every cell with an instance classifier; its max per class is a max-pooling MIL
prediction. Stream 2 takes, per class, the highest-scoring ("critical") cell and attends to all
cells by query similarity to it, giving one bag embedding per class for a bag classifier. As in
the paper, each stream is trained with its own loss (0.5 each: ``stream_logits``) and the
prediction averages the two streams' probabilities. The paper's loss is a per-class binary
cross-entropy (multi-label); here each stream's is the multi-class cross-entropy milhema trains
every model with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from milhema.models.attention import masked_softmax
from milhema.models.base import MILModel, MILOutput, cell_encoder, predicted_class_scores, require
from milhema.models.registry import register_model


@register_model("dsmil")
class DSMIL(MILModel):
    """Dual-stream MIL with critical-instance attention.

    Args (beyond :class:`MILModel`'s):
        query_dim: width of the query space (default ``hidden_dim // 2``).

    Gated fusion adds the CBC term to the query projection (before its tanh), so the CBC changes
    which cells look similar to the critical ones. ``embedding`` is the fused, flattened class-wise
    bag embeddings ``[B, F]`` with ``F = fusion.out_dim`` over ``K * H``; ``class_cell_scores``
    ``[B, N, K]`` is each class's attention and ``cell_scores`` the predicted class's.
    """

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, query_dim: int | None = None) -> None:
        query_dim = query_dim if query_dim is not None else max(1, hidden_dim // 2)
        require(isinstance(query_dim, int) and query_dim >= 1, f"query_dim must be a positive int, got {query_dim!r}")
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim,
                         dropout=dropout, embed_dim=n_classes * hidden_dim, gate_dim=query_dim)
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim))
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim))
        self.scale = 1.0 / math.sqrt(query_dim)
        # DSMIL's bag classifier is a Conv1d over the K class embeddings, i.e. a linear map of
        # their concatenation; here it reads the CBC-fused concatenation.
        self.bag_classifier = nn.Linear(self.fusion.out_dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]`` -> :class:`MILOutput` (coords, view unused)."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        h = self.fusion.cells(self.encoder(x), cbc)                               # [B, N, H]
        inst = self.instance_classifier(h)                                         # [B, N, K]
        inst_masked = inst.masked_fill(~mask[..., None], float("-inf"))
        # Stream 1: max over valid cells; a bag without cells gets 0 instead of -inf.
        has_cells = mask.any(1, keepdim=True)                                     # [B, 1]
        max_logits = torch.where(has_cells, inst_masked.amax(dim=1), torch.zeros_like(inst[:, 0]))

        q_pre = self.query(h)                                                     # [B, N, Q]
        gate = self.fusion.gate(cbc)
        if gate is not None:
            q_pre = q_pre + gate[:, None, :]
        q = torch.tanh(q_pre)
        critical = inst_masked.argmax(dim=1)                                      # [B, K] cell index
        q_crit = q.gather(1, critical[..., None].expand(-1, -1, q.shape[-1]))     # [B, K, Q]
        sim = torch.einsum("bnq,bkq->bnk", q, q_crit) * self.scale                # [B, N, K]
        attn = masked_softmax(sim, mask[..., None], dim=1)                       # [B, N, K]
        bags = torch.einsum("bnk,bnh->bkh", attn.to(h.dtype), self.value(h))      # [B, K, H]
        emb = self.fusion.bag(bags.flatten(1), cbc)
        bag_logits = self.bag_classifier(emb)
        # log of the mean of the two streams' probabilities: softmax(logits) is that mean.
        probs = 0.5 * (torch.softmax(max_logits.float(), -1) + torch.softmax(bag_logits.float(), -1))
        logits = torch.log(probs.clamp_min(1e-12))
        return MILOutput(logits=logits, cell_scores=predicted_class_scores(attn, logits), embedding=emb,
                         class_cell_scores=attn, stream_logits=(max_logits, bag_logits))
