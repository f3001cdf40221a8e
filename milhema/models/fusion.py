"""How the complete blood count (CBC) enters a MIL model.

One :class:`CBCFusion` per model offers three hooks, each the identity unless its mode uses it,
so every model supports every mode with the same three calls:

- ``cells(h, cbc)``: ``film`` modulates every cell embedding (FiLM, Perez et al. 2018);
- ``gate(cbc)``: ``gated`` returns a CBC term that the model adds inside its attention
  (the sigmoid branch of gated attention, a query, or a class token), so the CBC changes *which*
  cells are looked at;
- ``bag(z, cbc)``: ``concat`` appends an MLP of the CBC to the bag embedding; ``bilinear`` takes
  the Kronecker product of small projections with a constant 1 appended (Chen et al. 2020,
  Pathomic fusion), which keeps both unimodal terms and all pairwise interactions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from milhema.errors import ConfigError

FUSION_MODES = ("none", "concat", "film", "gated", "bilinear")


class CBCFusion(nn.Module):
    """CBC fusion hooks for one model.

    Args:
        mode: one of :data:`FUSION_MODES`. With ``cbc_dim == 0`` every mode behaves as ``none``.
        cbc_dim: width C of the preprocessed CBC vector.
        embed_dim: width E of the bag embedding given to :meth:`bag`.
        cell_dim: width H of the cell embeddings given to :meth:`cells`.
        gate_dim: width A of the term :meth:`gate` returns.
        dropout: dropout on the CBC branch (training only).
        concat_dim: width of the CBC MLP output in ``concat`` mode.
        bilinear_dims: projection widths (bag, CBC) in ``bilinear`` mode; output is
            ``(p + 1) * (q + 1)`` wide.

    Attributes:
        out_dim: width of :meth:`bag`'s output.
        gate_out_dim: width of :meth:`gate`'s output (0 unless gated).
        active: whether the CBC is used at all.
    """

    def __init__(self, mode: str, cbc_dim: int, *, embed_dim: int, cell_dim: int, gate_dim: int,
                 dropout: float = 0.25, concat_dim: int = 32, bilinear_dims: tuple[int, int] = (32, 8)) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ConfigError(f"fusion mode {mode!r} is not one of {', '.join(FUSION_MODES)}")
        self.mode = mode if cbc_dim > 0 else "none"
        self.active = self.mode != "none"
        self.out_dim = embed_dim
        self.gate_out_dim = 0
        if self.mode == "film":
            self.film = nn.Linear(cbc_dim, 2 * cell_dim)
            # Small weights and zero bias: gamma ~ 1, beta ~ 0, so training starts near the
            # unconditioned model and the CBC effect grows only as far as it helps.
            with torch.no_grad():
                self.film.weight.mul_(0.1)
                self.film.bias.zero_()
        elif self.mode == "gated":
            self.gate_net = nn.Sequential(nn.Linear(cbc_dim, gate_dim), nn.Dropout(dropout))
            self.gate_out_dim = gate_dim
        elif self.mode == "concat":
            self.mlp = nn.Sequential(nn.Linear(cbc_dim, concat_dim), nn.ReLU(), nn.Dropout(dropout))
            self.out_dim = embed_dim + concat_dim
        elif self.mode == "bilinear":
            p, q = bilinear_dims
            self.proj_bag = nn.Sequential(nn.Linear(embed_dim, p), nn.ReLU(), nn.Dropout(dropout))
            self.proj_cbc = nn.Sequential(nn.Linear(cbc_dim, q), nn.ReLU(), nn.Dropout(dropout))
            self.out_dim = (p + 1) * (q + 1)

    def cells(self, h: Tensor, cbc: Tensor | None) -> Tensor:
        """FiLM of cell embeddings ``h [B, N, H]`` (``film`` mode), else ``h`` unchanged."""
        if self.mode != "film" or cbc is None:
            return h
        gamma, beta = self.film(cbc).chunk(2, dim=-1)                       # [B, H] each
        return h * (1.0 + gamma[:, None, :]) + beta[:, None, :]

    def gate(self, cbc: Tensor | None) -> Tensor | None:
        """``[B, A]`` CBC term added inside the model's attention (``gated`` mode), else None."""
        if self.mode != "gated" or cbc is None:
            return None
        return self.gate_net(cbc)

    def bag(self, z: Tensor, cbc: Tensor | None) -> Tensor:
        """Bag embedding ``z [B, E]`` -> ``[B, out_dim]`` (``concat`` / ``bilinear``), else ``z``."""
        if cbc is None or self.mode not in ("concat", "bilinear"):
            return z
        if self.mode == "concat":
            return torch.cat([z, self.mlp(cbc)], dim=-1)
        ones = z.new_ones(z.shape[0], 1)
        pz = torch.cat([self.proj_bag(z), ones], dim=-1)                    # [B, p + 1]
        qc = torch.cat([self.proj_cbc(cbc), ones], dim=-1)                  # [B, q + 1]
        return torch.einsum("bp,bq->bpq", pz, qc).flatten(1)               # [B, (p + 1)(q + 1)]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, out_dim={self.out_dim}"
