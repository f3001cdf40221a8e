"""PNG figures: cell galleries, slide heatmaps, crop mosaics and the cohort overview.

Every function returns the PNG as bytes (written to disk and embedded in the HTML report).
"""

from __future__ import annotations

import io
import math
import textwrap
import zlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

CMAP = "viridis"
_PLACEHOLDER = 200  # grey tile where a cell has no thumbnail
DPI = 100  # figures are saved at this resolution and shown 1:1 in the report: 1 pt of type = 1.39 px
LABEL_PT = 9.0  # type size of the labels under thumbnails (>= 8 pt once displayed)
TITLE_PT = 10.0
MAX_WIDTH_PX = 1100  # the report's column: wider figures would be shrunk by the browser
MIN_TILE_PX = 96  # thumbnails smaller than this are enlarged by a whole factor (64 px -> 128 px)
_GAP = 8  # px between tiles

# One colour per cell type, fixed by name so that every figure of a report (and every report)
# agrees: a qualitative palette of distinct hues ("20 simple distinct colours", Trubetskoy), with
# the lineages kept apart (band vs blast, lymphocyte vs eosinophil). Other names get one of
# _OTHER_COLOURS by a hash of the name, the same in every figure.
CELL_TYPE_COLOURS: dict[str, str] = {
    "neutrophil": "#4363d8", "band": "#808000", "lymphocyte": "#3cb44b", "reactive_lymphocyte": "#469990",
    "monocyte": "#911eb4", "vacuolated_monocyte": "#f032e6", "eosinophil": "#f58231", "basophil": "#000075",
    "blast": "#e6194b", "blast_auer": "#800000", "promyelocyte": "#9a6324", "hypogranular_neutrophil": "#42d4f4",
    "pseudo_pelger": "#000000", "vacuolated_neutrophil": "#e6b400", "smudge": "#a9a9a9", "unmatched": "#d3d3d3",
    "": "#d3d3d3", "unknown": "#d3d3d3",
}
_OTHER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#bcbd22", "#7f7f7f")


def type_colour(cell_type: str | None) -> str:
    """The hex colour of ``cell_type`` in every figure (light grey for no type)."""
    name = "" if cell_type is None else str(cell_type)
    if name in CELL_TYPE_COLOURS:
        return CELL_TYPE_COLOURS[name]
    return _OTHER_COLOURS[zlib.crc32(name.encode("utf-8")) % len(_OTHER_COLOURS)]


def _rgb(colour: str) -> np.ndarray:
    return (np.array(to_rgb(colour)) * 255).round().astype(np.uint8)


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _png_exact(fig: plt.Figure) -> bytes:
    """The figure at its own pixel size (no cropping, no resampling): see :func:`_pixel_axes`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def _pixel_axes(canvas: np.ndarray, top: int = 0, right: int = 0) -> tuple[plt.Figure, plt.Axes]:
    """A figure of exactly the canvas's pixels (plus ``top`` and ``right`` px bands) showing it 1:1.

    Data coordinates of the axes are the canvas's pixels (x right, y down), so text and tiles
    line up to the pixel and no thumbnail is resampled.
    """
    h, w = canvas.shape[:2]
    width, height = w + right, h + top
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0.0, 0.0, w / width, h / height))
    ax.imshow(canvas, interpolation="nearest", extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    return fig, ax


def tile_scale(size: int) -> int:
    """The whole factor by which thumbnails of ``size`` px are enlarged (nearest neighbour) in galleries."""
    return max(1, math.ceil(MIN_TILE_PX / max(size, 1)))


def _tile(thumbnails: np.ndarray | None, i: int, scale: int = 1) -> np.ndarray:
    tile = np.full((64, 64, 3), _PLACEHOLDER, np.uint8) if thumbnails is None else thumbnails[i]
    return tile if scale == 1 else np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)


def _wrap(cell_type: str, chars: int) -> list[str]:
    """A cell type's name in lines of at most ``chars`` characters (underscores read as spaces)."""
    return textwrap.wrap(cell_type.replace("_", " "), max(chars, 4), break_long_words=True) or [""]


def gallery_k(n_cells: int, top_k: int, bottom: bool = True) -> int:
    """How many cells each section of a gallery shows: ``top_k``, at most the bag's cells, and with a
    bottom section at most half of them, so that "highest" and "lowest" never share a cell."""
    if bottom and n_cells >= 2:
        return max(0, min(top_k, n_cells // 2))
    return max(0, min(top_k, n_cells))


def gallery(thumbnails: np.ndarray | None, scores: np.ndarray, cell_types: np.ndarray | None, k: int,
            title: str, bottom: bool = True, ncols: int = 8, ranked: bool = True) -> bytes:
    """Top-``k`` (and bottom-``k``) cells by ``scores [N]``, each labelled with score and cell type.

    ``thumbnails`` is ``[N, S, S, 3]`` uint8 or None (grey tiles). No cell appears twice: with a
    bottom section each shows at most ``N // 2`` cells (:func:`gallery_k`). With ``ranked`` False
    (scores nearly uniform) one section shows ``k`` cells spread evenly over the bag, in bag order,
    without scores. Thumbnails are drawn 1:1 or enlarged by a whole factor, with ``LABEL_PT`` labels
    and a bar in the cell type's colour under each.
    """
    scores = np.asarray(scores)
    n = len(scores)
    if ranked:
        order = np.argsort(-scores, kind="stable")
        k = gallery_k(n, k, bottom)
        sections = [(f"{title}: highest scores", order[:k])]
        if bottom and k and n >= 2:
            sections.append((f"{title}: lowest scores", order[::-1][:k]))
    else:
        k = min(k, n)
        pick = np.unique(np.linspace(0, n - 1, k).round().astype(int)) if k else np.zeros(0, int)
        sections = [(f"{title}: {len(pick)} of {n} cells in bag order (not ranked)", pick)]
    size = 64 if thumbnails is None else int(thumbnails.shape[1])
    scale = tile_scale(size)
    side = size * scale
    cell_w = side + _GAP
    ncols = max(1, min(ncols, max(k, 1), MAX_WIDTH_PX // cell_w))
    line = math.ceil(LABEL_PT * DPI / 72 * 1.25)
    chars = int(side // (LABEL_PT * DPI / 72 * 0.6))
    labels = {int(i): ([f"{scores[i]:.3g}"] if ranked else [])
              + (_wrap(str(cell_types[i]), chars) if cell_types is not None and str(cell_types[i]) else [])
              for _, sel in sections for i in sel}
    n_lines = max([len(v) for v in labels.values()] + [1])
    bar = 5
    row_h = side + bar + 4 + n_lines * line + 6
    head = math.ceil(TITLE_PT * DPI / 72 * 1.6)
    heights = [head + max(1, math.ceil(len(sel) / ncols)) * row_h for _, sel in sections]
    canvas = np.full((sum(heights), ncols * cell_w, 3), 255, np.uint8)
    texts: list[tuple[float, float, str, float, str]] = []
    y0 = 0
    for (name, sel), height in zip(sections, heights, strict=True):
        texts.append((_GAP / 2, y0 + head / 2, name, TITLE_PT, "left"))
        for j, i in enumerate(sel):
            r, c = divmod(j, ncols)
            x, y = c * cell_w + _GAP // 2, y0 + head + r * row_h
            canvas[y:y + side, x:x + side] = _tile(thumbnails, int(i), scale)
            if cell_types is not None:
                canvas[y + side + 2:y + side + 2 + bar, x:x + side] = _rgb(type_colour(str(cell_types[i])))
            texts.append((x + side / 2, y + side + bar + 4, "\n".join(labels[int(i)]), LABEL_PT, "center"))
        y0 += height
    fig, ax = _pixel_axes(canvas)
    for tx, ty, text, pt, align in texts:
        ax.text(tx, ty, text, fontsize=pt, ha=align, va="center" if align == "left" else "top",
                linespacing=1.1, fontweight="bold" if align == "left" else "normal")
    return _png_exact(fig)


def slide_heatmap(rgb: np.ndarray, downsample: float, coords: np.ndarray, pct: np.ndarray, title: str,
                  top: int = 0, ranked: bool = True) -> bytes:
    """The slide thumbnail ``rgb [h, w, 3]`` with one marker per cell coloured by score percentile.

    ``coords [N, 2]`` are level-0 px and divided by ``downsample`` (level 0 / thumbnail);
    ``pct [N]`` in (0, 100]. The ``top`` highest cells get a red ring. With ``ranked`` False (scores
    nearly uniform) every cell gets the same colour and no ring: there is no ranking to show.
    """
    fig, ax = plt.subplots(figsize=(8, 8 * rgb.shape[0] / max(rgb.shape[1], 1) + 0.5))
    ax.imshow(rgb)
    xy = coords / downsample
    if ranked:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=pct, cmap=CMAP, vmin=0, vmax=100, s=40, edgecolors="white",
                            linewidths=0.5)
        handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="grey", markeredgecolor="white",
                          label="cell (colour = score percentile)")]
    else:
        ax.scatter(xy[:, 0], xy[:, 1], color="#4363d8", s=40, edgecolors="white", linewidths=0.5)
        handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="#4363d8", markeredgecolor="white",
                          label="cell (scores nearly uniform: not ranked)")]
    if top and ranked:
        best = np.argsort(-pct, kind="stable")[:top]
        ax.scatter(xy[best, 0], xy[best, 1], s=140, facecolors="none", edgecolors="red", linewidths=1.2)
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="red",
                              label=f"top {len(best)} cells"))
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.8)
    if ranked:
        bar = fig.colorbar(points, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label("score percentile within the patient", fontsize=9)
        bar.ax.tick_params(labelsize=9)
    ax.set_title(title, fontsize=TITLE_PT)
    ax.axis("off")
    return _png(fig)


def mosaic(thumbnails: np.ndarray | None, scores: np.ndarray, pct: np.ndarray, title: str,
           max_cells: int = 400, border: int = 4, ranked: bool = True) -> bytes:
    """All cells (up to ``max_cells``, highest first) as tiles framed in their score-percentile colour.

    Used instead of a heatmap for crop folders, whose cells have no slide position. Tiles are drawn
    at their own resolution (1:1). With ``ranked`` False (scores nearly uniform) the cells are in bag
    order with grey frames.
    """
    scores = np.asarray(scores)
    order = (np.argsort(-scores, kind="stable") if ranked else np.arange(len(scores)))[:max_cells]
    cmap = plt.get_cmap(CMAP)
    size = 64 if thumbnails is None else thumbnails.shape[1]
    side = size + 2 * border
    colourbar = 90 if ranked else 0
    ncols = max(1, min((MAX_WIDTH_PX - colourbar) // side, math.ceil(math.sqrt(len(order) * 1.5))))
    nrows = max(1, math.ceil(len(order) / ncols))
    canvas = np.full((nrows * side, ncols * side, 3), 255, np.uint8)
    for j, i in enumerate(order):
        r, c = divmod(j, ncols)
        colour = (np.array(cmap(pct[i] / 100.0)[:3]) * 255).astype(np.uint8) if ranked else _PLACEHOLDER
        y, x = r * side, c * side
        canvas[y:y + side, x:x + side] = colour
        canvas[y + border:y + border + size, x + border:x + border + size] = _tile(thumbnails, i)
    head = math.ceil(TITLE_PT * DPI / 72 * 2.2)
    fig, _ = _pixel_axes(canvas, top=head, right=colourbar)
    width, height = canvas.shape[1] + colourbar, canvas.shape[0] + head
    shown = f" (top {len(order)} of {len(scores)})" if len(order) < len(scores) else ""
    what = f"cells by score, highest first{shown}" if ranked else "cells in bag order (scores nearly uniform: not ranked)"
    fig.text(4 / width, 1 - head / 2 / height, f"{title}: {what}", fontsize=TITLE_PT, va="center")
    if ranked:
        cax = fig.add_axes((1 - (colourbar - 12) / width, 0.05, 14 / width, 0.9 * canvas.shape[0] / height))
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=CMAP, norm=plt.Normalize(0, 100)), cax=cax)
        bar.set_label("score percentile (frame)", fontsize=9)
        bar.ax.tick_params(labelsize=9)
    return _png_exact(fig)


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
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.6), layout="constrained")
    points = axes[0].scatter(xy[:, 0], xy[:, 1], c=np.asarray(pct)[keep], cmap=CMAP, vmin=0, vmax=100, s=6)
    fig.colorbar(points, ax=axes[0], label="score percentile within the patient")
    axes[0].set_title("by score percentile", fontsize=TITLE_PT)
    if cell_types is not None:
        types = np.asarray(cell_types, dtype=object)[keep]
        types = np.where(types == "", "unknown", types)
        names, counts = np.unique(types.astype(str), return_counts=True)
        for name in names[np.argsort(-counts, kind="stable")]:   # rare types drawn last, on top
            sel = types == name
            axes[1].scatter(xy[sel, 0], xy[sel, 1], s=8, color=type_colour(str(name)), label=str(name))
        handles, labels = axes[1].get_legend_handles_labels()
        order = np.argsort(labels)
        axes[1].legend([handles[i] for i in order], [labels[i] for i in order], fontsize=9, markerscale=2,
                       loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        axes[1].set_title("by cell type", fontsize=TITLE_PT)
    else:
        axes[1].text(0.5, 0.5, "no cell types in the bags", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("by cell type", fontsize=TITLE_PT)
    for ax in axes:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(title, fontsize=11)
    return _png(fig)
