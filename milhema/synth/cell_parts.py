"""Building blocks of the white-cell renderers: outlines, nucleus shapes and their chromatin
texture, cytoplasm layers, granules, vacuoles and nucleoli.

Everything is drawn on a :class:`~milhema.synth.shapes._Canvas` in µm (signed distance fields,
negative inside) and added to the canvas's four stain-density layers (see
:mod:`milhema.synth.stain`); nucleus builders return the nucleus's signed distance field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from milhema.synth.shapes import (
    _TWO_PI,
    _Blob,
    _blob,
    _Canvas,
    _curve,
    _fit,
    _harmonics,
    _hyp,
    _path_sdf,
    _sample,
    _smax,
    _smin,
)
from milhema.synth.stain import _CYT, _EOS, _GRA, _NUC

# --------------------------------------------------------------------------------------------
# Building blocks shared by the cell types
# --------------------------------------------------------------------------------------------

def _chromatin(cv: _Canvas, nuc_sdf: np.ndarray, base: float, *, clump: float = 0.0, clump_um: float = 0.7,
               fine: float = 0.0, lace: float = 0.0, rim: float = 0.25) -> np.ndarray:
    """Chromatin density: base × texture. ``clump``: dark heterochromatin blocks with pale gaps;
    ``fine``: stippling of open chromatin; ``lace``: thread network (monocytes); ``rim``: the
    condensed chromatin lining the nuclear membrane."""
    d = np.ones(cv.shape, dtype=np.float32)
    if clump:
        d += clump * np.tanh(1.6 * cv.noise(clump_um))
    if fine:
        d += fine * cv.noise(0.28)
    if lace:
        n = cv.noise(0.42)
        d += lace * (np.exp(-2.0 * n * n) - 0.45)
    if rim:
        d *= 1.0 + rim * np.exp(np.minimum(nuc_sdf, 0.0) * (1.0 / 0.45))
    return base * np.maximum(d, 0.1)


def _fine_granules(cv: _Canvas, amount: float) -> np.ndarray:
    """Neutrophilic granules: below optical resolution, they show as a fine lilac speckle."""
    n = cv.noise(0.16)
    return amount * (0.75 + 0.45 * np.maximum(n, 0.0))


def _lay_cell(cv: _Canvas, body_sdf: np.ndarray, nuc_sdf: np.ndarray, chrom: np.ndarray,
              cyto: Mapping[int, np.ndarray | float]) -> tuple[np.ndarray, np.ndarray]:
    """Fill ``cv.dens`` with cytoplasm layers (under the nucleus partly) and the chromatin.

    Returns (cell coverage, nucleus coverage).
    """
    a = cv.cover(body_sdf)
    nmask = cv.cover(np.maximum(nuc_sdf, body_sdf + 0.1))   # the nucleus never pokes out of the cell
    # The nucleus sits in the thick middle of the cell: little cytoplasm above or below it.
    under = a * (1.0 - 0.75 * nmask)
    for ch, val in cyto.items():
        cv.dens[ch] += val * under
    cv.dens[_NUC] += chrom * nmask
    return a, nmask


def _vacuoles(cv: _Canvas, body_sdf: np.ndarray, nuc_sdf: np.ndarray, n: int, r_lo: float, r_hi: float) -> None:
    """Punch n clear round vacuoles into the cytoplasm (lighter than it, with a thin darker rim)."""
    rng = cv.rng
    radii = rng.uniform(r_lo, r_hi, n)
    r_mid = float(np.median(radii))
    ys, xs = _sample((body_sdf < -(r_mid + 0.25)) & (nuc_sdf > 0.6 * r_mid), n, rng)
    vac = np.zeros(cv.shape, dtype=np.float32)
    rim = np.zeros(cv.shape, dtype=np.float32)
    mpp = cv.mpp
    for y, x, r in zip(ys.tolist(), xs.tolist(), radii[:ys.size].tolist(), strict=True):
        # Only the vacuole's own box is computed: a cell may hold a dozen of them.
        half = int(r / mpp) + 3
        y0, y1 = max(y - half, 0), min(y + half + 1, cv.shape[0])
        x0, x1 = max(x - half, 0), min(x + half + 1, cv.shape[1])
        dy = ((np.arange(y0, y1, dtype=np.float32) - y) * mpp)[:, None]
        dx = ((np.arange(x0, x1, dtype=np.float32) - x) * mpp)[None, :]
        dist = np.sqrt(dx * dx + dy * dy) - np.float32(r)
        box = (slice(y0, y1), slice(x0, x1))
        vac[box] = np.maximum(vac[box], cv.cover(dist))
        rim[box] = np.maximum(rim[box], np.exp(-(dist * (1.0 / 0.14)) ** 2))
    for ch in (_CYT, _EOS, _GRA):
        cv.dens[ch] *= 1.0 - 0.9 * vac
    cv.dens[_NUC] *= 1.0 - 0.3 * vac   # a vacuole over the nucleus edge barely lightens it
    cv.dens[_CYT] += 0.10 * rim * (1.0 - cv.cover(nuc_sdf))


def _nucleoli(cv: _Canvas, nuc_sdf: np.ndarray, n: int, r_lo: float, r_hi: float, strength: float) -> None:
    """Pale bluish nucleoli with a faint ring of condensed chromatin."""
    rng = cv.rng
    for r in rng.uniform(r_lo, r_hi, n):
        ys, xs = _sample(nuc_sdf < -(r + 0.5), 1, rng)
        if ys.size == 0:
            continue
        cx, cy = cv.px(ys[0], xs[0])
        a = r * rng.uniform(1.0, 1.3)
        blob = _Blob(float(cx), float(cy), a, r * r / a, rng.uniform(0, _TWO_PI), *_harmonics(rng, 0.08, 4))
        sdf = blob.sdf(cv.x, cv.y)
        cov = cv.cover(sdf)
        ring = np.exp(-((sdf - 0.1) * (1.0 / 0.22)) ** 2)
        cv.dens[_NUC] *= 1.0 - strength * cov
        cv.dens[_NUC] *= 1.0 + 0.18 * ring
        cv.dens[_CYT] += 0.45 * strength * cov


def _lobed_nucleus(cv: _Canvas, n_lobes: int, lobe_r: float, fit_r: float) -> np.ndarray:
    """Segmented nucleus: ``n_lobes`` lobes of mean radius ``lobe_r`` µm (ovals across the chain)
    along a curling path, a short gap apart and joined by thin chromatin strands."""
    rng = cv.rng
    heading = rng.uniform(0.0, _TWO_PI)
    turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
    radii = lobe_r * rng.uniform(0.85, 1.1, n_lobes)
    aspects = rng.uniform(1.3, 1.8, n_lobes)
    across = radii / np.sqrt(aspects)      # each lobe's half-width along the chain (its short axis)
    pts = [np.zeros(2)]
    heads = [heading]
    for i in range(n_lobes - 1):
        heading += turn + rng.normal(0.0, 0.35)
        step = across[i] + across[i + 1] + rng.uniform(0.9, 1.8)
        pts.append(pts[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
        heads.append(heading)
    p = np.array(pts)
    p -= 0.5 * (p.max(axis=0) + p.min(axis=0))
    # The chain's ends reach out by a lobe's short axis (lobes lie across the chain); squeezing the
    # chain more than that would press the lobes into one mass.
    p = _fit(p, float(across.max()) + 0.3, fit_r)
    sdf: np.ndarray | None = None
    for (cx, cy), h, r, aspect in zip(p, heads, radii, aspects, strict=True):
        lobe = _blob(rng, float(r), aspect=float(aspect), irregular=0.06, kmax=4, cx=cx, cy=cy,
                     angle=h + math.pi / 2 + rng.normal(0.0, 0.4)).sdf(cv.u, cv.v)
        sdf = lobe if sdf is None else np.minimum(sdf, lobe)
    assert sdf is not None  # p always has at least one lobe (pts starts with the origin)
    for i in range(n_lobes - 1):
        # Mostly thread-thin filaments; sometimes a broader isthmus (less mature cells).
        w = rng.uniform(0.15, 0.3) if rng.random() < 0.8 else lobe_r * rng.uniform(0.35, 0.5)
        strand = _path_sdf(cv.u, cv.v, p[i:i + 2], np.array([w, w]))
        sdf = _smin(sdf, strand, 0.2)
    return sdf


def _bilobed_nucleus(cv: _Canvas, lobe_r: float, gap: float, bridge: float, fit_r: float,
                     centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Two oval lobes (mean radius ``lobe_r`` µm, long axes across the line between them), ``gap`` µm
    apart and joined by a bridge of radius ``bridge`` (µm): the 'spectacle' shape."""
    rng = cv.rng
    r1 = lobe_r * rng.uniform(0.9, 1.1)
    r2 = lobe_r * rng.uniform(0.85, 1.05)
    a1, a2 = rng.uniform(1.0, 1.4), rng.uniform(1.0, 1.4)
    s1, s2 = r1 / math.sqrt(a1), r2 / math.sqrt(a2)     # half-widths along the line between the lobes
    half = 0.5 * (s1 + s2 + gap)
    half = min(half, fit_r - max(s1, s2))
    ang = rng.uniform(0.0, _TWO_PI)
    d = np.array([math.cos(ang), math.sin(ang)]) * half
    c = np.array(centre)
    across = ang + math.pi / 2
    l1 = _blob(rng, r1, aspect=a1, irregular=0.05, kmax=4, cx=c[0] + d[0], cy=c[1] + d[1], angle=across)
    l2 = _blob(rng, r2, aspect=a2, irregular=0.05, kmax=4, cx=c[0] - d[0], cy=c[1] - d[1], angle=across)
    sdf = np.minimum(l1.sdf(cv.u, cv.v), l2.sdf(cv.u, cv.v))
    # The bridge bows a little, as the thin chromatin thread is rarely straight.
    bow = np.array([-d[1], d[0]]) * rng.normal(0.0, 0.15)
    path = np.stack([c + d, c + bow, c - d])
    return _smin(sdf, _path_sdf(cv.u, cv.v, path, np.full(3, bridge)), 0.25)


def _band_nucleus(cv: _Canvas, fit_r: float) -> np.ndarray:
    """Unsegmented curved sausage of even width: C, U or (rarely) S shape."""
    rng = cv.rng
    half_w = rng.uniform(1.15, 1.6)
    pts = _curve(rng, rng.uniform(9.0, 13.0), rng.uniform(2.6, 4.3), n=10, s_shape=rng.random() < 0.2)
    pts = _fit(pts, half_w, fit_r)
    radii = half_w * (1.0 + 0.07 * rng.standard_normal(len(pts)))
    return _path_sdf(cv.u, cv.v, pts, radii)


def _monocyte_nucleus(cv: _Canvas, fit_r: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Kidney, horseshoe or folded nucleus, eccentric. Returns (sdf, fold-line coverage or None)."""
    rng = cv.rng
    off_ang = rng.uniform(0.0, _TWO_PI)
    off = rng.uniform(0.3, 1.8)

    def shift(extent: float) -> tuple[float, float]:
        # Eccentric, but never pushed through the cell membrane.
        o = min(off, max(fit_r - extent, 0.0))
        return o * math.cos(off_ang), o * math.sin(off_ang)

    kind = rng.random()
    fold = None
    if kind < 0.4:
        a, b = rng.uniform(4.6, 5.8), rng.uniform(3.4, 4.2)
        ox, oy = shift(a)
        ang = rng.uniform(0.0, _TWO_PI)
        ell = _Blob(ox, oy, a, b, ang, *_harmonics(rng, 0.05, 4))
        rn = rng.uniform(2.0, 3.0)
        depth = b + rn * rng.uniform(0.25, 0.6)
        nx, ny = ox - math.sin(ang) * depth, oy + math.cos(ang) * depth
        notch = _hyp(cv.u - nx, cv.v - ny) - rn
        sdf = _smax(ell.sdf(cv.u, cv.v), -notch, 0.6)
    elif kind < 0.7:
        hw = rng.uniform(2.0, 2.7)
        pts = _curve(rng, rng.uniform(10.5, 14.0), rng.uniform(2.8, 4.0), n=8)
        pts = _fit(pts, hw, fit_r)
        ext = float(_hyp(pts[:, 0], pts[:, 1]).max()) + hw
        pts = pts + np.array(shift(ext))
        sdf = _path_sdf(cv.u, cv.v, pts, hw * (1.0 + 0.12 * rng.standard_normal(pts.shape[0])))
    else:
        blob = _blob(rng, rng.uniform(4.3, 5.3), aspect=rng.uniform(1.1, 1.5), irregular=0.11, kmax=5)
        blob.cx, blob.cy = shift(blob.extent())
        sdf = blob.sdf(cv.u, cv.v)
        # A fold of the nuclear membrane shows as a darker crease across the nucleus.
        line = _curve(rng, rng.uniform(3.0, 6.0), rng.uniform(-1.5, 1.5), n=5) + np.array([blob.cx, blob.cy])
        fold = cv.cover(_path_sdf(cv.u, cv.v, line, np.full(5, 0.2)))
    return sdf, fold


def _round_nucleus(cv: _Canvas, cell_r: float, size: float, ecc: float, *, aspect: float = 1.15,
                   irregular: float = 0.03, cleft: float = 0.0) -> tuple[np.ndarray, tuple[float, float]]:
    """Round/oval nucleus of radius size·cell_r pushed ``ecc`` of the free room off-centre,
    with an optional small cleft. Returns (sdf, centre)."""
    rng = cv.rng
    rn = size * cell_r
    asp = rng.uniform(1.0, aspect)
    off = max(cell_r - rn * math.sqrt(asp) * (1.0 + 2 * irregular), 0.0) * ecc
    oa = rng.uniform(0.0, _TWO_PI)
    cx, cy = off * math.cos(oa), off * math.sin(oa)
    sdf = _blob(rng, rn, aspect=asp, irregular=irregular, cx=cx, cy=cy).sdf(cv.u, cv.v)
    if cleft > 0.0 and rng.random() < cleft:
        ca = rng.uniform(0.0, _TWO_PI)
        cr = rn * rng.uniform(0.2, 0.35)
        d = rn + cr * 0.4
        notch = _hyp(cv.u - (cx + d * math.cos(ca)), cv.v - (cy + d * math.sin(ca))) - cr
        sdf = _smax(sdf, -notch, 0.3)
    return sdf, (cx, cy)


def _body(cv: _Canvas, outline: _Blob) -> np.ndarray:
    return outline.sdf(cv.u, cv.v)


def _outline(rng: np.random.Generator, diameter: float, irregular: float, aspect: float = 1.1,
             kmax: int = 6) -> _Blob:
    return _blob(rng, diameter / 2.0, aspect=rng.uniform(1.0, aspect), irregular=irregular, kmax=kmax)
