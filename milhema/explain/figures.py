"""PNG figures: cell galleries, slide heatmaps, crop mosaics and the cohort overview.

Every function returns the PNG as bytes (written to disk and embedded in the HTML report).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

CMAP = "viridis"
_PLACEHOLDER = 200  # grey tile where a cell has no thumbnail


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _tile(thumbnails: np.ndarray | None, i: int) -> np.ndarray:
    if thumbnails is None:
        return np.full((64, 64, 3), _PLACEHOLDER, np.uint8)
    return thumbnails[i]


def _label(score: float, cell_type: str | None) -> str:
    text = f"{score:.3g}"
    return f"{text}\n{cell_type}" if cell_type else text


def _grid(thumbnails: np.ndarray | None, sel: np.ndarray, ncols: int, pad: int = 22) -> tuple[np.ndarray, int]:
    """Tiles of cells ``sel`` on a white canvas with ``pad`` px under each for its label; returns (canvas, side)."""
    size = 64 if thumbnails is None else thumbnails.shape[1]
    nrows = max(1, math.ceil(len(sel) / ncols))
    canvas = np.full((nrows * (size + pad), ncols * (size + 4), 3), 255, np.uint8)
    for j, i in enumerate(sel):
        r, c = divmod(j, ncols)
        canvas[r * (size + pad):r * (size + pad) + size, c * (size + 4):c * (size + 4) + size] = _tile(thumbnails, i)
    return canvas, size


def gallery(thumbnails: np.ndarray | None, scores: np.ndarray, cell_types: np.ndarray | None, k: int,
            title: str, bottom: bool = True, ncols: int = 8) -> bytes:
    """Top-``k`` (and bottom-``k``) cells by ``scores [N]``, each labelled with score and cell type.

    ``thumbnails`` is ``[N, S, S, 3]`` uint8 or None (grey tiles). One image per section with
    text under each tile: far faster to draw than one matplotlib axes per cell.
    """
    order = np.argsort(-scores, kind="stable")
    k = min(k, len(scores))
    sections = [("highest scores", order[:k])]
    if bottom:
        sections.append(("lowest scores", order[::-1][:k]))
    ncols = max(1, min(ncols, k))
    pad = 22
    grids = [_grid(thumbnails, sel, ncols, pad) for _, sel in sections]
    heights = [g.shape[0] for g, _ in grids]
    width = grids[0][0].shape[1]
    fig, axes = plt.subplots(len(sections), 1, figsize=(width / 60, sum(heights) / 60 + 0.5 * len(sections)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, sel), (canvas, size) in zip(axes[:, 0], sections, grids, strict=True):
        ax.imshow(canvas)
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.axis("off")
        for j, i in enumerate(sel):
            r, c = divmod(j, ncols)
            ax.text(c * (size + 4) + size / 2, r * (size + pad) + size + 1,
                    _label(float(scores[i]), None if cell_types is None else str(cell_types[i])),
                    ha="center", va="top", fontsize=6)
    return _png(fig)


def slide_heatmap(rgb: np.ndarray, downsample: float, coords: np.ndarray, pct: np.ndarray, title: str,
                  top: int = 0) -> bytes:
    """The slide thumbnail ``rgb [h, w, 3]`` with one marker per cell coloured by score percentile.

    ``coords [N, 2]`` are level-0 px and divided by ``downsample`` (level 0 / thumbnail);
    ``pct [N]`` in (0, 100]. The ``top`` highest cells get a red ring.
    """
    fig, ax = plt.subplots(figsize=(8, 8 * rgb.shape[0] / max(rgb.shape[1], 1) + 0.5))
    ax.imshow(rgb)
    xy = coords / downsample
    points = ax.scatter(xy[:, 0], xy[:, 1], c=pct, cmap=CMAP, vmin=0, vmax=100, s=40, edgecolors="white",
                        linewidths=0.5)
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="grey", markeredgecolor="white",
                      label="cell (colour = score percentile)")]
    if top:
        best = np.argsort(-pct, kind="stable")[:top]
        ax.scatter(xy[best, 0], xy[best, 1], s=140, facecolors="none", edgecolors="red", linewidths=1.2)
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="red",
                              label=f"top {len(best)} cells"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(points, ax=ax, fraction=0.04, pad=0.02, label="score percentile within the patient")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return _png(fig)


def mosaic(thumbnails: np.ndarray | None, scores: np.ndarray, pct: np.ndarray, title: str,
           max_cells: int = 400, border: int = 4) -> bytes:
    """All cells (up to ``max_cells``, highest first) as tiles framed in their score-percentile colour.

    Used instead of a heatmap for crop folders, whose cells have no slide position.
    """
    order = np.argsort(-scores, kind="stable")[:max_cells]
    cmap = plt.get_cmap(CMAP)
    size = 64 if thumbnails is None else thumbnails.shape[1]
    side = size + 2 * border
    ncols = max(1, min(20, math.ceil(math.sqrt(len(order) * 1.5))))
    nrows = max(1, math.ceil(len(order) / ncols))
    canvas = np.full((nrows * side, ncols * side, 3), 255, np.uint8)
    for j, i in enumerate(order):
        r, c = divmod(j, ncols)
        colour = (np.array(cmap(pct[i] / 100.0)[:3]) * 255).astype(np.uint8)
        y, x = r * side, c * side
        canvas[y:y + side, x:x + side] = colour
        canvas[y + border:y + border + size, x + border:x + border + size] = _tile(thumbnails, i)
    fig, ax = plt.subplots(figsize=(min(14, 0.6 * ncols + 1.5), min(20, 0.6 * nrows + 1)))
    ax.imshow(canvas)
    mappable = plt.cm.ScalarMappable(cmap=CMAP, norm=plt.Normalize(0, 100))
    fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02, label="score percentile (frame colour)")
    shown = f" (top {len(order)} of {len(scores)})" if len(order) < len(scores) else ""
    ax.set_title(f"{title}: cells by score, highest first{shown}", fontsize=10)
    ax.axis("off")
    return _png(fig)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """``[N, D] -> [N, 2]`` principal components of the standardised features."""
    x = np.asarray(features, np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-9, x.std(0), 1.0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:2].T
    return np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))


def overview(features: np.ndarray, pct: np.ndarray, cell_types: Sequence[str] | np.ndarray | None, title: str,
             max_points: int = 20000, seed: int = 0) -> bytes:
    """Two panels of the 2-D PCA of ``features [N, D]``: coloured by score percentile and by cell type."""
    n = len(features)
    keep = np.arange(n)
    if n > max_points:  # plotting, not PCA, is the cost: subsample for the picture only
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    xy = pca_2d(features)[keep]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    points = axes[0].scatter(xy[:, 0], xy[:, 1], c=np.asarray(pct)[keep], cmap=CMAP, vmin=0, vmax=100, s=6)
    fig.colorbar(points, ax=axes[0], label="score percentile within the patient")
    axes[0].set_title("by score percentile", fontsize=10)
    if cell_types is not None:
        types = np.asarray(cell_types, dtype=object)[keep]
        types = np.where(types == "", "unknown", types)
        palette = plt.get_cmap("tab20")
        for j, name in enumerate(sorted(set(types.tolist()))):
            sel = types == name
            axes[1].scatter(xy[sel, 0], xy[sel, 1], s=6, color=palette(j % 20), label=name)
        axes[1].legend(fontsize=7, markerscale=2, loc="best")
        axes[1].set_title("by cell type", fontsize=10)
    else:
        axes[1].text(0.5, 0.5, "no cell types in the bags", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("by cell type", fontsize=10)
    for ax in axes:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(title, fontsize=11)
    return _png(fig)
