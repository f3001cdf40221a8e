"""Single-cell crops as exported by CellaVision-like analysers: a background
(:mod:`milhema.synth.background`) with one white cell (:mod:`milhema.synth.cells`) near the
centre, composed to RGB. Sizes in pixels; the crop spans 24 µm unless ``mpp`` is given.

All randomness comes from the ``rng`` argument: the same seed gives byte-identical images.
"""

from __future__ import annotations

import math

import numpy as np

from milhema.synth.background import _draw_rbcs, compose, render_background_od
from milhema.synth.cells import _render_cell, paste_cell
from milhema.synth.shapes import _TWO_PI
from milhema.synth.stain import Stain, _densities_to_od


def render_crop(cell_type: str, rng: np.random.Generator, stain: Stain, size: int = 96,
                mpp: float | None = None, light: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A single-cell crop as a CellaVision-style export: background + one white cell at the centre (small random
    offset ≤ 2 µm and random rotation). mpp defaults to 24 µm / size (so the crop always spans 24 µm).
    ``light`` is the light through clean glass (float32 [size, size, 3] or [3], 0-255; default a white lamp
    of 255), see :func:`~milhema.synth.background.compose`.
    Returns rgb uint8 [size, size, 3] and the nucleus mask bool [size, size] of the central cell.
    """
    if size < 8:
        raise ValueError(f"size must be ≥ 8 px, got {size}")
    mpp = 24.0 / size if mpp is None else float(mpp)
    cell = _render_cell(cell_type, rng, mpp)
    r_off = 2.0 * math.sqrt(rng.random()) / mpp
    a_off = rng.uniform(0.0, _TWO_PI)
    cx = round((size - 1) / 2 + r_off * math.cos(a_off))
    cy = round((size - 1) / 2 + r_off * math.sin(a_off))
    radius = 0.5 * max(cell.cell.shape) - 1.0   # the trimmed box just holds the cell
    od = render_background_od((size, size), rng, stain, mpp, keep_out=(cx, cy, radius))
    if cell.hug:
        # Red cells nestled in the scallops of a reactive lymphocyte's outline.
        layer = np.zeros((size, size), dtype=np.float32)
        hug = np.array(cell.hug) / mpp + np.array([cx, cy])
        _draw_rbcs(layer, hug, rng, mpp)
        od += layer[..., None] * stain.eosin_od
    paste_cell(od, _densities_to_od(cell.dens, stain), cell.cell > 0.5, (cx, cy), alpha=cell.alpha)
    nucleus = np.zeros((size, size), dtype=bool)
    _paste_mask(nucleus, cell.nucleus > 0.5, cx, cy)
    return compose(od, rng, stain, light), nucleus


def _paste_mask(dst: np.ndarray, mask: np.ndarray, cx: int, cy: int) -> None:
    h, w = mask.shape
    y0, x0 = cy - h // 2, cx - w // 2
    ys = slice(max(y0, 0), min(y0 + h, dst.shape[0]))
    xs = slice(max(x0, 0), min(x0 + w, dst.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        dst[ys, xs] |= mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
