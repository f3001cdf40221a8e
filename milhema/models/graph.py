"""Graph MIL: a GNN over a k-nearest-neighbour graph of each bag's cells, pooled by attention.

The kNN graph is built with ``torch.cdist`` on the padded batch (no torch-cluster needed), in
feature space (blood smears, where neighbours are look-alike cells) or in slide space from cell
coordinates (marrow, where neighbours are physically adjacent cells). Valid cells become the
nodes of one PyG mini-batch; padding never enters the graph.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

from milhema.models.attention import GatedAttention
from milhema.models.base import MILModel, MILOutput, cell_encoder, require
from milhema.models.registry import register_model

GRAPH_SPACES = ("features", "coords")
CONVS = ("gatv2", "gen")


@functools.cache
def _pyg() -> tuple[ModuleType, ModuleType]:
    """``torch_geometric.nn`` and ``torch_geometric.utils``, imported on first use.

    Importing torch-geometric takes seconds (it registers its whole operator library), and only
    the graph model needs it; registering the model must not cost every command that start-up
    (``load_config`` imports all models to check parameters).
    """
    with warnings.catch_warnings():
        # torch-geometric scripts a helper with torch.jit at import time, which torch >= 2.10 flags
        # as deprecated; the warning is about the library, not about anything a user can change.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        import torch_geometric.nn as pyg_nn
        import torch_geometric.utils as pyg_utils
    return pyg_nn, pyg_utils


def knn_edges(points: Tensor, mask: Tensor, k: int, group: Tensor | None = None) -> Tensor:
    """Directed kNN edges within each bag of a padded batch.

    Args:
        points: ``[B, N, P]`` positions used for distances.
        mask: ``[B, N]`` valid cells.
        k: neighbours per cell; effectively ``min(k, n_valid - 1)`` per bag (self excluded).
        group: ``[B, N]`` long; when given, cells are linked only within their group (the
            slide of each cell, for coordinates: two smears' pixels are not one space).

    Returns:
        ``[3, E]`` long: bag index, neighbour (source) index and cell (target) index within the bag.
    """
    b, n, _ = points.shape
    dist = torch.cdist(points.float(), points.float())                          # [B, N, N]
    allowed = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=mask.device)
    if group is not None:
        allowed &= group[:, :, None] == group[:, None, :]
    dist = dist.masked_fill(~allowed, float("inf"))
    k_eff = min(k, n - 1)
    if k_eff < 1:
        return torch.zeros(3, 0, dtype=torch.long, device=points.device)
    near, idx = dist.topk(k_eff, dim=-1, largest=False)                          # [B, N, k_eff]
    keep = torch.isfinite(near)              # drops padding and the slots beyond n_valid - 1
    bag, tgt, slot = keep.nonzero(as_tuple=True)
    return torch.stack([bag, idx[bag, tgt, slot], tgt])


@register_model("graph")
class GraphMIL(MILModel):
    """Encoder -> FiLM hook -> kNN graph -> residual GATv2/GEN layers -> attentional aggregation -> bag fusion -> head.

    Args (beyond :class:`MILModel`'s):
        k: neighbours per cell in the kNN graph.
        graph_space: ``"features"`` (kNN on the encoded cells) or ``"coords"`` (kNN on cell
            centres; a bag whose coordinates are missing or NaN falls back to features).
        conv: ``"gatv2"`` (GATv2Conv, Brody et al. 2022) or ``"gen"`` (GENConv, Li et al. 2020).
        n_layers: number of graph convolutions, each ``h + Dropout(ReLU(conv(h)))``.
        heads: attention heads of GATv2 (must divide ``hidden_dim``).
        attn_dim: hidden width of the gated attention readout (default ``hidden_dim // 2``).

    The readout is gated attention per node, normalised by ``torch_geometric.utils.softmax``
    over each bag's nodes; with gated fusion the CBC term enters that gate. Those per-node
    weights are the ``cell_scores``.
    """

    test_variants = ({"conv": "gen"}, {"graph_space": "coords", "k": 3})

    def __init__(self, in_dim: int, n_classes: int, *, cbc_dim: int = 0, fusion: str = "none",
                 hidden_dim: int = 128, dropout: float = 0.25, k: int = 8, graph_space: str = "features",
                 conv: str = "gatv2", n_layers: int = 2, heads: int = 1, attn_dim: int | None = None) -> None:
        attn_dim = attn_dim if attn_dim is not None else max(1, hidden_dim // 2)
        require(isinstance(k, int) and k >= 1, f"k must be a positive int, got {k!r}")
        require(graph_space in GRAPH_SPACES, f"graph_space must be one of {', '.join(GRAPH_SPACES)}, got {graph_space!r}")
        require(conv in CONVS, f"conv must be one of {', '.join(CONVS)}, got {conv!r}")
        require(isinstance(n_layers, int) and n_layers >= 1, f"n_layers must be a positive int, got {n_layers!r}")
        require(isinstance(heads, int) and heads >= 1 and hidden_dim % heads == 0,
                f"heads must be a positive int dividing hidden_dim={hidden_dim}, got {heads!r}")
        require(isinstance(attn_dim, int) and attn_dim >= 1, f"attn_dim must be a positive int, got {attn_dim!r}")
        super().__init__(in_dim, n_classes, cbc_dim=cbc_dim, fusion=fusion, hidden_dim=hidden_dim,
                         dropout=dropout, gate_dim=attn_dim)
        self.k = k
        self.graph_space = graph_space
        self.encoder = cell_encoder(in_dim, hidden_dim, dropout)
        pyg_nn, _ = _pyg()
        if conv == "gatv2":
            # Self-loops let a cell keep its own message; a single-cell bag has only that one.
            convs = [pyg_nn.GATv2Conv(hidden_dim, hidden_dim // heads, heads=heads, add_self_loops=True)
                     for _ in range(n_layers)]
        else:
            # Layer norm, not GENConv's default batch norm: nodes of different bags must not
            # share statistics, and a one-cell batch must train.
            convs = [pyg_nn.GENConv(hidden_dim, hidden_dim, aggr="softmax", learn_t=True, norm="layer")
                     for _ in range(n_layers)]
        self.convs = nn.ModuleList(convs)
        self.drop = nn.Dropout(dropout)
        self.readout = GatedAttention(hidden_dim, attn_dim, cond_dim=self.fusion.gate_out_dim)
        self.head = nn.Linear(self.fusion.out_dim, n_classes)

    def _points(self, h: Tensor, mask: Tensor, coords: Tensor | None) -> Tensor:
        """Positions for the kNN graph: encoded features, or coordinates where every valid cell has them."""
        feats = h.detach().float()          # the graph is a discrete choice; no gradient through it
        if self.graph_space != "coords" or coords is None:
            return feats
        coords = coords.float()
        usable = (torch.isfinite(coords).all(-1) | ~mask).all(-1)                 # [B]
        # Pad coordinates with zeros up to the feature width so both kinds share one tensor;
        # zero columns do not change Euclidean distances.
        pos = torch.zeros_like(feats)
        pos[..., :2] = torch.nan_to_num(coords, nan=0.0)[..., : feats.shape[-1]]
        return torch.where(usable[:, None, None], pos, feats)

    def forward(self, x: Tensor, mask: Tensor, cbc: Tensor | None = None, coords: Tensor | None = None,
                view: Tensor | None = None, slide: Tensor | None = None) -> MILOutput:
        """``x [B, N, D]``, ``mask [B, N]``, ``cbc [B, C]``, ``coords [B, N, 2]``, ``slide [B, N]`` -> :class:`MILOutput`."""
        x, mask, cbc = self.prepare(x, mask, cbc)
        b, n = mask.shape
        h = self.fusion.cells(self.encoder(x), cbc)                                 # [B, N, H]
        # In slide space a cell's neighbours are on its own smear; look-alike cells may be on any.
        group = slide if self.graph_space == "coords" else None
        bag, src, tgt = knn_edges(self._points(h, mask, coords), mask, self.k, group)

        # Node numbering of valid cells only, in row-major order of the padded batch.
        flat = mask.flatten()
        node_of = torch.cumsum(flat.long(), 0) - 1                                   # [B * N]
        edge_index = torch.stack([node_of[bag * n + src], node_of[bag * n + tgt]])
        nodes = h.flatten(0, 1)[flat]                                                # [M, H]
        batch = torch.arange(b, device=mask.device).repeat_interleave(n)[flat]       # [M]

        for conv in self.convs:
            nodes = nodes + self.drop(torch.relu(conv(nodes, edge_index)))

        gate = self.fusion.gate(cbc)
        cond = None if gate is None else gate[batch]
        _, pyg_utils = _pyg()  # cached after __init__'s call
        w = pyg_utils.softmax(self.readout.logits(nodes, cond).float(), batch, num_nodes=b)  # [M, 1], sums to 1 per bag
        z = pyg_utils.scatter(w.to(nodes.dtype) * nodes, batch, dim=0, dim_size=b, reduce="sum")  # [B, H]; empty bag -> 0
        emb = self.fusion.bag(z, cbc)
        scores = w.new_zeros(b * n)
        scores[flat] = w[:, 0]
        return MILOutput(logits=self.head(emb), cell_scores=scores.view(b, n), embedding=emb)
