"""Synthetic single white blood cells on a May-Grünwald-Giemsa (MGG) stained blood-smear background.

Everything is drawn in optical density (OD, absorbance per RGB channel) so that overlapping
structures combine the way stains do under transmitted light (Beer–Lambert: absorbances add) and a
per-slide :class:`Stain` recolours a whole smear at once. A cell is first drawn as four *stain
density* layers (chromatin, basophilic cytoplasm, eosin, azurophilic granules); the stain turns
densities into OD; :func:`~milhema.synth.background.compose` turns OD into RGB and adds focus
blur and sensor noise.

Shapes are signed distance fields in µm (negative inside), so every size is set in µm and the
pixel size ``mpp`` (µm per pixel) only enters when the fields are sampled: the same cell can be
rendered for a 96 px CellaVision-like crop or for a whole-slide tile.

All randomness comes from the ``rng`` argument: the same seed gives byte-identical images.

Module layout: :mod:`milhema.synth.stain` (the :class:`Stain`), :mod:`milhema.synth.shapes`
(signed-distance, noise and canvas primitives), :mod:`milhema.synth.cell_parts` (nuclei, chromatin,
granules, vacuoles shared by the cell types), this module (the cell types, :func:`render_cell_od`,
:func:`paste_cell`), :mod:`milhema.synth.background` (red cells, platelets, precipitate,
:func:`compose`) and :mod:`milhema.synth.crop` (:func:`render_crop`: background + one cell).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from milhema.synth.cell_parts import (
    _band_nucleus,
    _bilobed_nucleus,
    _body,
    _chromatin,
    _fine_granules,
    _lay_cell,
    _lobed_nucleus,
    _monocyte_nucleus,
    _nucleoli,
    _outline,
    _round_nucleus,
    _vacuoles,
)
from milhema.synth.shapes import (
    _TWO_PI,
    _Blob,
    _blob,
    _Canvas,
    _harmonics,
    _hyp,
    _path_sdf,
    _sample,
    _smax,
    _smin,
)
from milhema.synth.stain import _CYT, _EOS, _GRA, _NUC, Stain, _densities_to_od

CELL_TYPES: tuple[str, ...] = (
    "neutrophil", "band", "lymphocyte", "monocyte", "eosinophil", "basophil",
    "blast", "blast_auer", "promyelocyte",
    "hypogranular_neutrophil", "pseudo_pelger", "vacuolated_neutrophil", "vacuolated_monocyte",
    "reactive_lymphocyte", "smudge",
)

# Anomaly attributes a rendered cell may show (the attribute columns of the simulated truth), and the
# granularity (1 = normal) under which a neutrophil reads as hypogranular.
CELL_ATTRIBUTES: tuple[str, ...] = ("vacuoles", "hypogranular", "pseudo_pelger", "auer_rod")
_HYPOGRANULAR_BELOW = 0.5

# Red cells are pushed aside by a white cell but the cytoplasm is translucent: how much of the
# background OD a fully covering cell hides.
_COVER_ATTENUATION = 0.7


class _CellRender(NamedTuple):
    dens: np.ndarray         # [4, n, n] stain densities
    alpha: np.ndarray        # [n, n] soft cell coverage, hides the background under the cell
    cell: np.ndarray         # [n, n] soft coverage of cytoplasm ∪ nucleus
    nucleus: np.ndarray      # [n, n] soft coverage of the nucleus
    hug: tuple[tuple[float, float], ...]  # centres (µm, image frame) of red cells the cell wraps around


# --------------------------------------------------------------------------------------------
# Cell types
# --------------------------------------------------------------------------------------------

def _neutrophil_family(rng: np.random.Generator, mpp: float, *, nucleus: str, granularity: float,
                       vacuoles: int = 0, diameter: tuple[float, float] = (12.0, 15.0),
                       chromatin: float = 1.05, clump: float = 0.22) -> _CellRender:
    """Segmented/band/pseudo-Pelger neutrophils; ``granularity`` 1 = normal, ~0 = degranulated."""
    outline = _outline(rng, rng.uniform(*diameter), 0.025)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    fit_r = cell_r - 0.8
    if nucleus == "lobed":
        n_lobes = int(rng.choice([2, 3, 4, 5], p=[0.07, 0.43, 0.38, 0.12]))
        # Real segmented nuclei cover ~30–55 µm² whatever their number of lobes (wbc-seg's expert masks).
        lobe_r = math.sqrt(rng.uniform(30.0, 56.0) / (math.pi * n_lobes))
        nuc = _lobed_nucleus(cv, n_lobes, lobe_r, fit_r)
    elif nucleus == "band":
        nuc = _band_nucleus(cv, fit_r)
    elif rng.random() < 0.62:   # pseudo-Pelger, spectacle form
        nuc = _bilobed_nucleus(cv, rng.uniform(2.2, 2.8), rng.uniform(0.5, 1.9), rng.uniform(0.15, 0.3), fit_r)
    else:                       # pseudo-Pelger, round or peanut (non-segmented) form
        r = rng.uniform(2.6, 3.3)
        sep = r * rng.uniform(0.0, 0.8)
        ang = rng.uniform(0.0, _TWO_PI)
        dx, dy = sep * math.cos(ang), sep * math.sin(ang)
        a = _blob(rng, r, aspect=1.1, irregular=0.04, cx=dx, cy=dy).sdf(cv.u, cv.v)
        b = _blob(rng, r * 0.95, aspect=1.1, irregular=0.04, cx=-dx, cy=-dy).sdf(cv.u, cv.v)
        nuc = _smin(a, b, 0.5)
    chrom = _chromatin(cv, nuc, chromatin * rng.uniform(0.92, 1.08), clump=clump, clump_um=0.65, fine=0.07)
    g = granularity
    cyto: dict[int, np.ndarray | float] = {
        _GRA: _fine_granules(cv, 0.28 * g) + 0.03,
        _CYT: 0.04 + 0.20 * (1.0 - g),
        _EOS: 0.04 * g,
    }
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    if vacuoles:
        _vacuoles(cv, body, nuc, vacuoles, 0.28, 0.95)
    return _CellRender(cv.dens, a, a, nm, ())


def _neutrophil(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _neutrophil_family(rng, mpp, nucleus="lobed", granularity=rng.uniform(0.8, 1.15))


def _band(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _neutrophil_family(rng, mpp, nucleus="band", granularity=rng.uniform(0.8, 1.15))


def _hypogranular(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _neutrophil_family(rng, mpp, nucleus="lobed", granularity=rng.uniform(0.0, 0.15))


def _pelger_granularity(rng: np.random.Generator) -> float:
    """Half of pseudo-Pelger cells are also degranulated (as in MDS), the first draws of their rendering."""
    return float(rng.uniform(0.05, 0.4) if rng.random() < 0.5 else rng.uniform(0.7, 1.0))


def _pseudo_pelger(rng: np.random.Generator, mpp: float) -> _CellRender:
    g = _pelger_granularity(rng)
    return _neutrophil_family(rng, mpp, nucleus="pelger", granularity=g, diameter=(10.5, 14.0),
                              chromatin=1.25, clump=0.42)


def _vacuolated_neutrophil(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _neutrophil_family(rng, mpp, nucleus="lobed", granularity=rng.uniform(0.6, 1.1),
                              vacuoles=int(rng.integers(3, 13)))


def _lymphocyte(rng: np.random.Generator, mpp: float) -> _CellRender:
    outline = _outline(rng, rng.uniform(7.0, 10.0), 0.02, aspect=1.12)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    nuc, _ = _round_nucleus(cv, cell_r, rng.uniform(0.8, 0.9), rng.uniform(0.3, 0.9), cleft=0.2)
    chrom = _chromatin(cv, nuc, 1.18 * rng.uniform(0.93, 1.07), clump=0.25, clump_um=0.8, fine=0.05, rim=0.15)
    cyto = {_CYT: rng.uniform(0.6, 0.85) * (1.0 + 0.3 * np.exp(np.minimum(body, 0.0) * 2.0))}
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    return _CellRender(cv.dens, a, a, nm, ())


def _reactive_lymphocyte(rng: np.random.Generator, mpp: float) -> _CellRender:
    d = rng.uniform(12.0, 19.0)
    outline = _outline(rng, d, 0.035, aspect=1.25)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    # Scalloped outline: the soft cytoplasm flows around neighbouring red cells.
    hug = []
    n_bites = int(rng.integers(2, 5))
    start = rng.uniform(0.0, _TWO_PI)
    for i in range(n_bites):
        ang = start + i * _TWO_PI / n_bites + rng.normal(0.0, 0.35)
        rr = rng.uniform(3.5, 4.0)
        edge = outline.a if abs(math.cos(ang)) > 0.7 else outline.b
        dist = edge * 0.95 + rr - rng.uniform(0.9, 2.2)
        bx, by = dist * math.cos(ang), dist * math.sin(ang)
        bite = _hyp(cv.x - bx, cv.y - by) - rr
        body = _smax(body, -bite, 0.5)
        hug.append((bx, by))
    cell_r = min(outline.a, outline.b)
    rn = rng.uniform(3.0, 4.4)
    nuc, _ = _round_nucleus(cv, cell_r, rn / cell_r, rng.uniform(0.15, 0.7), aspect=1.3, cleft=0.25)
    chrom = _chromatin(cv, nuc, 0.88 * rng.uniform(0.92, 1.08), clump=0.18, clump_um=0.8, fine=0.07, rim=0.2)
    edge_dark = np.exp(np.minimum(body, 0.0) * (1.0 / rng.uniform(1.0, 1.8)))
    cyto = {_CYT: rng.uniform(0.45, 0.65) + rng.uniform(0.6, 1.0) * edge_dark + 0.05 * cv.noise(1.0)}
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    return _CellRender(cv.dens, a, a, nm, tuple(hug))


def _monocyte_family(rng: np.random.Generator, mpp: float, vacuoles: int) -> _CellRender:
    outline = _outline(rng, rng.uniform(15.0, 20.0), 0.05, aspect=1.25, kmax=7)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    fit_r = min(outline.a, outline.b) - 1.5
    nuc, fold = _monocyte_nucleus(cv, fit_r)
    chrom = _chromatin(cv, nuc, 0.68 * rng.uniform(0.9, 1.1), lace=0.45, clump=0.1, rim=0.18)
    if fold is not None:
        chrom = chrom * (1.0 + 0.35 * fold)
    cyto: dict[int, np.ndarray | float] = {
        _CYT: rng.uniform(0.45, 0.6) * (1.0 + 0.07 * cv.noise(0.5)),
        _GRA: _fine_granules(cv, 0.11),   # the faint azurophilic dust of "ground glass"
        _EOS: 0.03,
    }
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    if vacuoles:
        _vacuoles(cv, body, nuc, vacuoles, 0.3, 1.05)
    return _CellRender(cv.dens, a, a, nm, ())


def _monocyte(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _monocyte_family(rng, mpp, 0)


def _vacuolated_monocyte(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _monocyte_family(rng, mpp, int(rng.integers(4, 15)))


def _eosinophil(rng: np.random.Generator, mpp: float) -> _CellRender:
    outline = _outline(rng, rng.uniform(12.0, 15.0), 0.025)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    nuc = _bilobed_nucleus(cv, rng.uniform(2.4, 2.9), rng.uniform(0.6, 2.2), rng.uniform(0.2, 0.45), cell_r - 0.9)
    chrom = _chromatin(cv, nuc, 0.95 * rng.uniform(0.92, 1.08), clump=0.18, fine=0.06)
    a, nm = _lay_cell(cv, body, nuc, chrom, {_CYT: 0.05, _EOS: 0.3})
    # Packed refractile granules; a few lie over the nucleus. Saturation flattens their tops so they
    # read as discs rather than soft spots.
    inside = body < -0.2
    area = float(inside.sum()) * mpp * mpp
    cyto_px = inside & (nuc > 0.0)
    n = int(area * rng.uniform(2.2, 2.8))
    g = cv.dots(cyto_px, n, 0.27, 0.7, 1.3) + cv.dots(inside & (nuc <= 0.0), n // 10, 0.27, 0.6, 1.0)
    g = 1.0 - np.exp(-1.5 * g)
    cv.dens[_EOS] += 1.25 * g
    cv.dens[_GRA] += 0.12 * g
    return _CellRender(cv.dens, a, a, nm, ())


def _basophil(rng: np.random.Generator, mpp: float) -> _CellRender:
    outline = _outline(rng, rng.uniform(10.0, 14.0), 0.03)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    nuc = _bilobed_nucleus(cv, rng.uniform(1.8, 2.3), rng.uniform(-0.5, 1.0), rng.uniform(0.5, 0.9), cell_r - 1.0)
    chrom = _chromatin(cv, nuc, 0.6, clump=0.1, fine=0.08, rim=0.1)
    a, nm = _lay_cell(cv, body, nuc, chrom, {_CYT: 0.12, _GRA: 0.26})
    # Coarse, unevenly sized dark granules over the whole cell, hiding the nucleus.
    inside = body < -0.25
    area = float(inside.sum()) * mpp * mpp
    big = cv.dots(inside, int(area * rng.uniform(0.25, 0.45)), 0.42, 0.8, 1.5)
    small = cv.dots(inside, int(area * rng.uniform(0.2, 0.4)), 0.26, 0.6, 1.2)
    g = 1.0 - np.exp(-1.3 * (big + small))
    cv.dens[_NUC] += 1.45 * g
    cv.dens[_GRA] += 0.5 * g
    return _CellRender(cv.dens, a, a, nm, ())


def _blast_family(rng: np.random.Generator, mpp: float, auer: int) -> _CellRender:
    outline = _outline(rng, rng.uniform(12.0, 19.0), 0.025, aspect=1.15)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    # High N/C ratio. Auer-rod blasts get a little more (and more eccentric) cytoplasm to hold the rod,
    # with ranges overlapping those of plain blasts so that the rod, not the N/C ratio, tells them apart.
    nc = rng.uniform(0.55, 0.75) if auer else rng.uniform(0.65, 0.9)
    ecc = rng.uniform(0.6, 0.95) if auer else rng.uniform(0.0, 0.6)
    nuc, _ = _round_nucleus(cv, cell_r, math.sqrt(nc), ecc, aspect=1.2, irregular=0.035, cleft=0.2)
    chrom = _chromatin(cv, nuc, 0.56 * rng.uniform(0.88, 1.12), clump=0.05, clump_um=0.5, fine=0.11, rim=0.12)
    cyto = {_CYT: rng.uniform(1.2, 1.6) * (1.0 + 0.05 * cv.noise(0.6))}
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    _nucleoli(cv, nuc, int(rng.integers(1, 4)), 0.55, 1.05, rng.uniform(0.35, 0.5))
    for _ in range(auer):
        _auer_rod(cv, body, nuc)
    return _CellRender(cv.dens, a, a, nm, ())


def _auer_rod(cv: _Canvas, body: np.ndarray, nuc: np.ndarray) -> None:
    """A needle of fused azurophilic granules, 3–6 µm long, lying in the cytoplasm."""
    rng = cv.rng
    length = rng.uniform(3.0, 6.0)
    # Try a few random placements and keep the one whose axis runs best through the cytoplasm
    # (the crescent of a blast is thin and curved; a rod may still cross onto the nucleus).
    ys, xs = _sample((body < -0.5) & (nuc > 0.2), 24, rng)
    if ys.size == 0:
        return
    cxs, cys = cv.px(ys, xs)
    angs = rng.uniform(0.0, math.pi, ys.size)
    t = np.linspace(-0.5, 0.5, 9)[None, :] * length
    px = cxs[:, None] + t * np.cos(angs)[:, None]
    py = cys[:, None] + t * np.sin(angs)[:, None]
    half = cv.shape[0] // 2
    iy = np.clip(np.rint(py / cv.mpp).astype(int) + half, 0, cv.shape[0] - 1)
    ix = np.clip(np.rint(px / cv.mpp).astype(int) + half, 0, cv.shape[1] - 1)
    score = (body[iy, ix] < -0.3).sum(axis=1) * 2 + (nuc[iy, ix] > 0.0).sum(axis=1)
    best = int(np.argmax(score))
    pts = np.stack([px[best, [0, 4, 8]], py[best, [0, 4, 8]]], axis=-1)
    w = rng.uniform(0.3, 0.5)
    sdf = _path_sdf(cv.x, cv.y, pts, np.array([0.08, w, 0.08]))
    cov = cv.cover(np.maximum(sdf, body + 0.35))   # stays inside the cell membrane
    # The rod displaces cytoplasm and chromatin under it, so it reads red-purple rather than black.
    cv.dens[_CYT] *= 1.0 - 0.7 * cov
    cv.dens[_NUC] *= 1.0 - 0.5 * cov
    cv.dens[_GRA] += rng.uniform(1.2, 1.5) * cov
    cv.dens[_EOS] += rng.uniform(0.9, 1.2) * cov


def _blast(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _blast_family(rng, mpp, 0)


def _blast_auer(rng: np.random.Generator, mpp: float) -> _CellRender:
    return _blast_family(rng, mpp, 1 if rng.random() < 0.7 else 2)


def _promyelocyte(rng: np.random.Generator, mpp: float) -> _CellRender:
    outline = _outline(rng, rng.uniform(15.0, 21.0), 0.03, aspect=1.15)
    cv = _Canvas(rng, mpp, outline.extent() + 0.3)
    body = _body(cv, outline)
    cell_r = min(outline.a, outline.b)
    nuc, (ncx, ncy) = _round_nucleus(cv, cell_r, rng.uniform(0.5, 0.62), rng.uniform(0.4, 0.75),
                                     aspect=1.2, irregular=0.035, cleft=0.3)
    chrom = _chromatin(cv, nuc, 0.66 * rng.uniform(0.9, 1.1), clump=0.1, fine=0.1, rim=0.15)
    # Golgi zone: a pale, granule-poor area against the nucleus on the side facing the cell centre.
    rn = math.sqrt(max(float((nuc < 0).sum()), 1.0) / math.pi) * cv.mpp
    dn = math.hypot(ncx, ncy) + 1e-6
    gx, gy = ncx - ncx / dn * rn * 1.05, ncy - ncy / dn * rn * 1.05
    golgi = np.exp(-(_hyp(cv.x - gx, cv.y - gy) / rng.uniform(1.8, 2.8)) ** 2)
    cyto = {_CYT: rng.uniform(0.65, 0.95) * (1.0 - 0.55 * golgi)}
    a, nm = _lay_cell(cv, body, nuc, chrom, cyto)
    if rng.random() < 0.5:
        _nucleoli(cv, nuc, 1, 0.4, 0.7, 0.25)
    inside = body < -0.2
    area = float(inside.sum()) * mpp * mpp
    n = int(area * rng.uniform(0.7, 1.1))
    g = cv.dots(inside & (nuc > 0.0), n, 0.24, 0.7, 1.4) + cv.dots(inside & (nuc <= 0.0), n // 6, 0.24, 0.6, 1.1)
    g *= 1.0 - 0.85 * golgi
    g = 1.0 - np.exp(-1.2 * g)
    cv.dens[_GRA] += 1.7 * g
    cv.dens[_EOS] += 0.2 * g
    cv.dens[_NUC] += 0.08 * g
    return _CellRender(cv.dens, a, a, nm, ())


def _smudge(rng: np.random.Generator, mpp: float) -> _CellRender:
    """Ruptured cell: a ragged, streaky smear of pale chromatin, often with a denser remnant."""
    length = rng.uniform(9.0, 20.0)
    width = rng.uniform(5.5, 10.0)
    outline = _Blob(0.0, 0.0, length / 2, width / 2, 0.0, *_harmonics(rng, 0.12, 5))
    cv = _Canvas(rng, mpp, outline.extent() + 1.0)
    ragged = outline.sdf(cv.u, cv.v) + 0.7 * cv.noise(0.8)
    cover = cv.cover(ragged)
    # Streaks run along the smear direction (u): a 1-D noise across v, wobbling along u.
    grid = np.linspace(-width, width, int(4 * width / 0.3) + 2)
    prof = ndi.gaussian_filter1d(rng.standard_normal(grid.size), 1.0)
    prof /= prof.std() + 1e-6
    wobble = 0.6 * cv.noise(1.5)
    streak = np.interp(cv.v + wobble, grid, prof).astype(np.float32)
    streak = 0.6 * streak * (0.5 + 0.5 * np.abs(cv.noise(2.5))) + 0.5 * cv.noise(0.6)
    along = np.clip(0.5 - cv.u / length, 0.0, 1.0)   # material thins out towards the tail
    d = 0.32 * (1.0 + 0.45 * streak) * (0.55 + 0.7 * along) * (1.0 + 0.15 * cv.noise(0.5))
    # A denser remnant of the nucleus near the head of the smear.
    core = _blob(rng, rng.uniform(1.8, 3.0), aspect=rng.uniform(1.0, 1.6), irregular=0.12,
                 cx=-length * rng.uniform(0.05, 0.25), cy=rng.normal(0.0, 0.8)).sdf(cv.u, cv.v)
    core_cov = cv.cover(core + 0.8 * cv.noise(0.6)) * rng.uniform(0.0, 0.5)
    cv.dens[_NUC] += np.maximum(d, 0.0) * cover + core_cov * cover
    cv.dens[_GRA] += 0.06 * cover
    return _CellRender(cv.dens, 0.35 * cover, cover, cover, ())


_BUILDERS: dict[str, Callable[[np.random.Generator, float], _CellRender]] = {
    "neutrophil": _neutrophil,
    "band": _band,
    "lymphocyte": _lymphocyte,
    "monocyte": _monocyte,
    "eosinophil": _eosinophil,
    "basophil": _basophil,
    "blast": _blast,
    "blast_auer": _blast_auer,
    "promyelocyte": _promyelocyte,
    "hypogranular_neutrophil": _hypogranular,
    "pseudo_pelger": _pseudo_pelger,
    "vacuolated_neutrophil": _vacuolated_neutrophil,
    "vacuolated_monocyte": _vacuolated_monocyte,
    "reactive_lymphocyte": _reactive_lymphocyte,
    "smudge": _smudge,
}
assert tuple(_BUILDERS) == CELL_TYPES


def cell_attributes(cell_type: str, rng: np.random.Generator) -> tuple[int, ...]:
    """0/1 for each of :data:`CELL_ATTRIBUTES`: what the cell of ``cell_type`` that is rendered next from
    ``rng`` (:func:`render_cell_od`, :func:`~milhema.synth.crop.render_crop`, a scan's cell) will show.

    ``rng`` is not advanced: a copy replays the draws that decide (a pseudo-Pelger cell's granularity),
    so the images stay the same whether or not this is called. Vacuoles, the pseudo-Pelger nucleus and
    Auer rods belong to their types (``vacuolated_*``, ``pseudo_pelger``, ``blast_auer``); hypogranular
    cytoplasm to ``hypogranular_neutrophil`` and the degranulated half of pseudo-Pelger cells.
    """
    _check_type(cell_type)
    if cell_type == "pseudo_pelger":
        hypogranular = _pelger_granularity(copy.deepcopy(rng)) < _HYPOGRANULAR_BELOW
    else:
        hypogranular = cell_type == "hypogranular_neutrophil"
    shown = {"vacuoles": cell_type in ("vacuolated_neutrophil", "vacuolated_monocyte"), "hypogranular": hypogranular,
             "pseudo_pelger": cell_type == "pseudo_pelger", "auer_rod": cell_type == "blast_auer"}
    return tuple(int(shown[name]) for name in CELL_ATTRIBUTES)


def _check_type(cell_type: str) -> None:
    if cell_type not in _BUILDERS:
        raise ValueError(f"unknown cell type {cell_type!r}; valid types: {', '.join(CELL_TYPES)}")


def _trim(r: _CellRender) -> _CellRender:
    """Crop the canvas symmetrically to the smallest odd box around the cell, keeping it centred."""
    h, w = r.alpha.shape
    on = r.cell > 0.0
    rows = np.flatnonzero(on.any(axis=1))
    cols = np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return r
    cy, cx = h // 2, w // 2
    hy = int(max(cy - rows[0], rows[-1] - cy)) + 1
    hx = int(max(cx - cols[0], cols[-1] - cx)) + 1
    sy = slice(max(cy - hy, 0), min(cy + hy + 1, h))
    sx = slice(max(cx - hx, 0), min(cx + hx + 1, w))
    return _CellRender(r.dens[:, sy, sx], r.alpha[sy, sx], r.cell[sy, sx], r.nucleus[sy, sx], r.hug)


def _render_cell(cell_type: str, rng: np.random.Generator, mpp: float) -> _CellRender:
    _check_type(cell_type)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return _trim(_BUILDERS[cell_type](rng, float(mpp)))


# --------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------

def render_cell_od(cell_type: str, rng: np.random.Generator, stain: Stain, mpp: float = 0.25,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One white cell on a transparent background.
    Returns od float32 [h, w, 3] (absorbance added by the cell), cell_mask bool [h, w] (cytoplasm ∪ nucleus),
    nucleus_mask bool [h, w]. h, w just big enough for the cell (odd, centred on the cell centre). Size in px = µm / mpp.

    The cell has a random size, outline, orientation and chromatin texture. ``mpp`` is µm per pixel.
    Paste it onto a background with :func:`paste_cell`. Raises ValueError for an unknown type.
    """
    r = _render_cell(cell_type, rng, mpp)
    return _densities_to_od(r.dens, stain), r.cell > 0.5, r.nucleus > 0.5


def paste_cell(od: np.ndarray, cell_od: np.ndarray, cell_mask: np.ndarray, centre: tuple[int, int],
               alpha: np.ndarray | None = None) -> None:
    """Put a cell from :func:`render_cell_od` on top of a background OD image, in place.

    od: float32 [H, W, 3] background; cell_od: [h, w, 3]; cell_mask: bool [h, w]; centre: (cx, cy) pixel
    of the cell's centre in ``od`` (the cell may hang over the border; it is clipped). The background under
    the cell is attenuated (the cell lies on top, red cells shine through a little) and the cell's OD added.
    ``alpha`` (float [h, w] in [0, 1]) replaces the hard mask for softer edges.
    """
    h, w = cell_mask.shape
    cx, cy = centre
    y0, x0 = cy - h // 2, cx - w // 2
    ys = slice(max(y0, 0), min(y0 + h, od.shape[0]))
    xs = slice(max(x0, 0), min(x0 + w, od.shape[1]))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    cys = slice(ys.start - y0, ys.stop - y0)
    cxs = slice(xs.start - x0, xs.stop - x0)
    a = cell_mask.astype(np.float32) if alpha is None else alpha.astype(np.float32, copy=False)
    a = a[cys, cxs, None]
    od[ys, xs] = od[ys, xs] * (1.0 - _COVER_ATTENUATION * a) + cell_od[cys, cxs]
