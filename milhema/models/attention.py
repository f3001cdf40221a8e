"""Gated attention pooling (Ilse et al. 2018) and a NaN-free masked softmax."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``logits`` over ``dim`` restricted to ``mask`` (True = keep).

    ``mask`` broadcasts against ``logits``. Masked entries get exactly 0, and a slice with no
    kept entry gets all zeros (never NaN, in the forward or the backward pass), which is what an
    empty bag or a missing view needs. Computed in float32 so mixed precision cannot overflow.
    """
    mask = mask.expand_as(logits)
    logits = logits.float().masked_fill(~mask, float("-inf"))
    top = logits.amax(dim=dim, keepdim=True).detach()
    top = top.masked_fill(~torch.isfinite(top), 0.0)        # an all-masked slice has max -inf
    e = torch.exp(logits - top)                             # exp(-inf) = 0 at masked entries
    total = e.sum(dim=dim, keepdim=True)
    # Divide empty slices by 1 (not by a clamped tiny number) so their gradient is exactly 0.
    return e / torch.where(total > 0, total, torch.ones_like(total))


class GatedAttention(nn.Module):
    """Gated attention: ``a = w^T (tanh(V h) * sigmoid(U h + cond))``, softmax over cells.

    Args:
        dim: input width H.
        attn_dim: hidden width A of the attention network.
        n_branches: number of independent attention maps (e.g. one per class, CLAM-MB style);
            the ``V`` and ``U`` projections are shared, each branch has its own ``w``.
        cond_dim: width of an optional conditioning vector added inside the sigmoid branch (so an
            outside signal such as the CBC can open or close the gate); 0 = unconditioned. If it
            differs from ``attn_dim`` it is linearly projected to ``attn_dim``.
    """

    def __init__(self, dim: int, attn_dim: int, n_branches: int = 1, cond_dim: int = 0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, n_branches)
        self.cond_dim = cond_dim
        self.cond_proj = nn.Linear(cond_dim, attn_dim, bias=False) if 0 < cond_dim != attn_dim else nn.Identity()

    def logits(self, h: Tensor, cond: Tensor | None = None) -> Tensor:
        """Unnormalised attention ``[..., n_branches]`` of ``h [..., H]``.

        ``cond`` (``[..., cond_dim]``) must broadcast against ``h``'s leading dimensions.
        """
        gate = self.U(h)
        if cond is not None:
            if self.cond_dim == 0:
                raise ValueError("this GatedAttention was built with cond_dim=0 but got a cond")
            gate = gate + self.cond_proj(cond)
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(gate))

    def forward(self, h: Tensor, mask: Tensor, cond: Tensor | None = None) -> Tensor:
        """Attention weights ``[B, N, n_branches]`` of ``h [B, N, H]`` with ``mask [B, N]``.

        ``cond`` is ``[B, cond_dim]`` (one vector per bag). Each branch sums to 1 over valid cells;
        padding gets 0 and an all-padding bag gets all zeros.
        """
        logits = self.logits(h, None if cond is None else cond[:, None, :])
        return masked_softmax(logits, mask[..., None], dim=1)
