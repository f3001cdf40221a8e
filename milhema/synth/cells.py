"""Synthetic single white blood cells on a May-Grünwald-Giemsa (MGG) stained blood-smear background.

Everything is drawn in optical density (OD, absorbance per RGB channel) so that overlapping
structures combine the way stains do under transmitted light (Beer–Lambert: absorbances add) and a
per-slide :class:`Stain` recolours a whole smear at once. A cell is first drawn as four *stain
density* layers (chromatin, basophilic cytoplasm, eosin, azurophilic granules); the stain turns
densities into OD; :func:`compose` turns OD into RGB and adds focus blur and sensor noise.

Shapes are signed distance fields in µm (negative inside), so every size is set in µm and the
pixel size ``mpp`` (µm per pixel) only enters when the fields are sampled: the same cell can be
rendered for a 96 px CellaVision-like crop or for a whole-slide tile.

All randomness comes from the ``rng`` argument: the same seed gives byte-identical images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

CELL_TYPES: tuple[str, ...] = (
    "neutrophil", "band", "lymphocyte", "monocyte", "eosinophil", "basophil",
    "blast", "blast_auer", "promyelocyte",
    "hypogranular_neutrophil", "pseudo_pelger", "vacuolated_neutrophil", "vacuolated_monocyte",
    "reactive_lymphocyte", "smudge",
)

# Density layers of a cell, in the order of the rows of the stain matrix.
_NUC, _CYT, _EOS, _GRA = range(4)

# Red cells are pushed aside by a white cell but the cytoplasm is translucent: how much of the
# background OD a fully covering cell hides.
_COVER_ATTENUATION = 0.7

_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------
# Stain
# --------------------------------------------------------------------------------------------

def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """OD of an RGB colour (0–255) seen through one unit of stain."""
    return (-np.log(np.asarray(rgb, dtype=np.float64) / 255.0)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Stain:
    """Per-slide appearance. OD = optical density (absorbance) per RGB channel, Beer–Lambert.

    Each ``*_od`` is a float32 array of shape (3,): the absorbance (natural log) in R, G, B of one
    unit of that stain; a pixel's colour is ``255 * exp(-sum(density_k * od_k))``.
    Arrays are stored as read-only copies. ``eq=False`` because arrays have no scalar equality.
    """

    nucleus_od: np.ndarray      # (3,) absorbance of chromatin (azure/methylene-blue: violet-purple)
    cytoplasm_od: np.ndarray    # (3,) basophilic cytoplasm (blue-grey)
    eosin_od: np.ndarray        # (3,) eosin (pink/orange: red cells, eosinophil granules)
    granule_od: np.ndarray      # (3,) azurophilic/neutrophilic granules (lilac-pink-purple)
    background_od: np.ndarray   # (3,) glass/plasma tint (small)
    blur_sigma: float           # px, focus blur applied to the composed image
    noise_sd: float             # sd of additive pixel noise, in 0-255 units

    def __post_init__(self) -> None:
        for name in ("nucleus_od", "cytoplasm_od", "eosin_od", "granule_od", "background_od"):
            arr = np.array(getattr(self, name), dtype=np.float32).reshape(3)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def default(cls) -> Stain:
        """A well-stained, well-focused slide: the centre of :meth:`random`."""
        return cls(
            # One unit of each stain, chosen from typical MGG colours: dense chromatin ~(85, 45, 125),
            # lymphocyte sky-blue cytoplasm at 0.7 units, red cells salmon-pink at 0.7 units.
            nucleus_od=_od((95, 52, 134)),
            cytoplasm_od=_od((160, 180, 225)),
            eosin_od=_od((235, 147, 137)),
            granule_od=_od((182, 100, 150)),
            background_od=_od((251, 246, 249)),
            blur_sigma=0.6,
            noise_sd=2.0,
        )

    @classmethod
    def random(cls, rng: np.random.Generator, strength: float = 1.0) -> Stain:
        """Random per-slide stain/scanner variation around default (hue & intensity shift of each OD vector, blur 0.3–1.5 px, noise); strength scales the variation (0 = default)."""
        s = float(max(strength, 0.0))
        d = cls.default()
        # Smear thickness and staining time darken every stain together; the separate per-stain
        # factors then move the balance (bluer or pinker slides) and the per-channel ones the hue.
        overall = math.exp(rng.normal(0.0, 0.12 * s))

        def jitter(v: np.ndarray, sd_int: float, sd_hue: float) -> np.ndarray:
            scale = overall * math.exp(rng.normal(0.0, sd_int * s))
            hue = np.exp(rng.normal(0.0, sd_hue * s, 3))
            return (v * scale * hue).astype(np.float32)

        nucleus = jitter(d.nucleus_od, 0.12, 0.08)
        cytoplasm = jitter(d.cytoplasm_od, 0.15, 0.10)
        eosin = jitter(d.eosin_od, 0.15, 0.10)
        granule = jitter(d.granule_od, 0.15, 0.10)
        # Background: brighter/duller glass and a faint colour cast (yellowish, bluish, pinkish).
        bg = d.background_od * math.exp(rng.normal(0.0, 0.5 * s)) + s * np.abs(rng.normal(0.0, 0.012, 3))
        blur = d.blur_sigma + min(s, 1.0) * (rng.uniform(0.3, 1.5) - d.blur_sigma)
        noise = d.noise_sd + min(s, 1.0) * (rng.uniform(1.0, 5.0) - d.noise_sd)
        return cls(nucleus, cytoplasm, eosin, granule, bg.astype(np.float32), float(blur), float(noise))

    def matrix(self) -> np.ndarray:
        """float32 [4, 3]: OD per unit density for the layers chromatin, cytoplasm, eosin, granules."""
        return np.stack([self.nucleus_od, self.cytoplasm_od, self.eosin_od, self.granule_od])


# --------------------------------------------------------------------------------------------
# Small field helpers (µm signed distances, smooth noise, dots)
# --------------------------------------------------------------------------------------------

def _hyp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean norm; np.hypot is ~10× slower on float32 and its overflow safety is not needed here."""
    return np.sqrt(a * a + b * b)


def _cover(sdf: np.ndarray, mpp: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the region sdf < 0 (sdf in µm, edge one pixel wide)."""
    return np.clip(0.5 - sdf * (1.0 / mpp), 0.0, 1.0)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two SDFs: fillets of size ~k µm where shapes meet, like chromatin bridges."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth intersection (use with -b for a rounded subtraction)."""
    return -_smin(-a, -b, k)


@dataclass
class _Blob:
    """A perturbed ellipse: centre (µm), semi-axes a, b (µm), angle (rad), radial harmonics."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    amps: tuple[float, ...] = ()     # amplitude of harmonic k = 2, 3, ... (fraction of the radius)
    phases: tuple[float, ...] = ()

    def extent(self) -> float:
        """Upper bound of the distance (µm) from the origin to any point of the blob."""
        return math.hypot(self.cx, self.cy) + max(self.a, self.b) * (1.0 + sum(abs(a) for a in self.amps))

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Approximate signed distance (µm): first-order correction of the ellipse's implicit function."""
        du = u - np.float32(self.cx)
        dv = v - np.float32(self.cy)
        if self.angle:
            c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
            du, dv = c * du + s * dv, c * dv - s * du
        ia, ib = np.float32(1.0 / self.a), np.float32(1.0 / self.b)
        p = du * ia
        q = dv * ib
        rho = np.sqrt(p * p + q * q) + np.float32(1e-6)
        r = np.float32(1.0)
        if len(self.amps):
            # cos(kθ + φ) from the angle-addition recurrence: no arctan2/cos per pixel.
            c1 = p / rho
            s1 = q / rho
            ck, sk = c1, s1
            for amp, ph in zip(self.amps, self.phases, strict=True):
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
                r = r + ck * np.float32(amp * math.cos(ph)) - sk * np.float32(amp * math.sin(ph))
        pa = p * ia
        qb = q * ib
        grad = np.sqrt(pa * pa + qb * qb) / rho
        return (rho - r) / np.maximum(grad, np.float32(1e-3))


def _blob(rng: np.random.Generator, r: float, *, aspect: float = 1.0, irregular: float = 0.0,
          kmax: int = 5, cx: float = 0.0, cy: float = 0.0, angle: float | None = None) -> _Blob:
    """Random blob of mean radius r µm; ``aspect`` = a/b; ``irregular`` = sd of radial harmonics."""
    amps, phases = _harmonics(rng, irregular, kmax)
    root = math.sqrt(aspect)
    ang = rng.uniform(0.0, _TWO_PI) if angle is None else angle
    return _Blob(float(cx), float(cy), r * root, r / root, float(ang), amps, phases)


def _harmonics(rng: np.random.Generator, irregular: float, kmax: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Random radial harmonics k = 2..kmax, amplitude sd ``irregular`` falling off as 1/sqrt(k)."""
    if irregular <= 0 or kmax < 2:
        return (), ()
    k = np.arange(2, kmax + 1)
    amps = irregular * rng.standard_normal(k.size) / np.sqrt(k / 2.0)
    phases = rng.uniform(0.0, _TWO_PI, k.size)
    return tuple(amps.tolist()), tuple(phases.tolist())


def _path_sdf(u: np.ndarray, v: np.ndarray, pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Signed distance (µm) to a tube along a polyline pts [n, 2] with radius radii [n] at each vertex."""
    pts = np.asarray(pts, dtype=np.float32)
    radii = np.asarray(radii, dtype=np.float32)
    p = pts[:-1, :, None, None]
    d = (pts[1:] - pts[:-1])[:, :, None, None]
    l2 = (d[:, 0] ** 2 + d[:, 1] ** 2) + 1e-9
    pu = u[None] - p[:, 0]
    pv = v[None] - p[:, 1]
    t = np.clip((pu * d[:, 0] + pv * d[:, 1]) / l2, 0.0, 1.0)
    r0 = radii[:-1, None, None]
    r1 = radii[1:, None, None]
    dist = _hyp(pu - t * d[:, 0], pv - t * d[:, 1]) - (r0 + t * (r1 - r0))
    return dist.min(axis=0)


def _curve(rng: np.random.Generator, length: float, turn: float, n: int = 9,
           s_shape: bool = False) -> np.ndarray:
    """Points [n, 2] (µm) of a smooth curve of given length turning by ``turn`` rad, centred on 0."""
    s = np.linspace(0.0, length, n)
    kappa = np.full(n, turn / length)
    if s_shape:
        kappa[n // 2:] *= -1.0
    kappa *= 1.0 + 0.25 * rng.standard_normal(n)
    heading = rng.uniform(0.0, _TWO_PI) + np.concatenate([[0.0], np.cumsum(kappa[:-1] * np.diff(s))])
    step = np.diff(s)
    mid = 0.5 * (heading[:-1] + heading[1:])
    xy = np.zeros((n, 2))
    xy[1:, 0] = np.cumsum(step * np.cos(mid))
    xy[1:, 1] = np.cumsum(step * np.sin(mid))
    return xy - 0.5 * (xy.max(axis=0) + xy.min(axis=0))


def _fit(pts: np.ndarray, margin: float, limit: float) -> np.ndarray:
    """Shrink point positions so that every point plus ``margin`` stays within radius ``limit``."""
    ext = float(_hyp(pts[:, 0], pts[:, 1]).max())
    room = max(limit - margin, 0.2)
    return pts * (room / ext) if ext > room else pts


def _noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise, float32, mean ≈ 0, sd ≈ 1, correlation length ``sigma_px``.

    Wide kernels are made on a coarse grid and upsampled: same look, a fraction of the cost.
    """
    h, w = shape
    f = max(1, int(sigma_px / 1.4))
    if f == 1:
        a = rng.standard_normal((h, w), dtype=np.float32)
        a = ndi.gaussian_filter(a, sigma_px, mode="wrap", truncate=2.5)
        # White noise through a (periodic) separable kernel k⊗k has sd Σk², no need to measure it.
        a *= np.float32(1.0 / _smoothed_sd(round(sigma_px, 3)))
        return a
    a = rng.standard_normal((h // f + 3, w // f + 3), dtype=np.float32)
    a = ndi.gaussian_filter(a, sigma_px / f, mode="wrap", truncate=3.0)
    a = _upsample(a, f, h, w)
    a -= a.mean()
    a *= 1.0 / (float(a.std()) + 1e-6)
    return a


@lru_cache(maxsize=256)
def _smoothed_sd(sigma_px: float) -> float:
    """sd of unit white noise after scipy's 2-D Gaussian filter (truncate=2.5)."""
    r = int(2.5 * sigma_px + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    return float((k * k).sum())


@lru_cache(maxsize=256)
def _lerp_index(n_out: int, n_in: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel: the coarse-grid cell (i0) and the fraction t towards i0 + 1."""
    pos = np.arange(n_out) / f
    i0 = np.minimum(pos.astype(np.intp), n_in - 2)
    t = (pos - i0).astype(np.float32)
    i0.setflags(write=False)
    t.setflags(write=False)
    return i0, t


def _upsample(a: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    """Separable bilinear upsampling of a coarse grid by an integer factor to [h, w]."""
    iy, ty = _lerp_index(h, a.shape[0], f)
    ix, tx = _lerp_index(w, a.shape[1], f)
    rows = a[iy] + (a[iy + 1] - a[iy]) * ty[:, None]
    return rows[:, ix] + (rows[:, ix + 1] - rows[:, ix]) * tx


def _gauss_peak(sigma_px: float) -> float:
    """Peak value of a unit-mass 2-D discrete Gaussian (so dots can be scaled to a unit peak)."""
    r = int(3.0 * sigma_px + 0.5)
    x = np.arange(-r, r + 1)
    return float(1.0 / np.exp(-0.5 * (x / sigma_px) ** 2).sum()) ** 2


def _dots(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, weights: np.ndarray,
          sigma_px: float) -> np.ndarray:
    """Image of round dots (granules) of peak ``weights`` at pixel positions, Gaussian profile."""
    img = np.zeros(shape, dtype=np.float32)
    np.add.at(img, (ys, xs), weights.astype(np.float32))
    if sigma_px < 0.35:
        return img
    img = ndi.gaussian_filter(img, sigma_px, truncate=3.0)
    img *= 1.0 / _gauss_peak(sigma_px)
    return img


def _sample(mask: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random pixel positions (ys, xs) drawn uniformly inside a boolean mask."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    pick = idx[rng.integers(0, idx.size, n)]
    return np.divmod(pick, mask.shape[1])


# --------------------------------------------------------------------------------------------
# The cell canvas
# --------------------------------------------------------------------------------------------

class _Canvas:
    """Square working area for one cell, centred on the cell centre.

    ``x, y`` are image-frame coordinates in µm (broadcastable [1, n] and [n, 1]); ``u, v`` are the same
    points in the cell's own frame, rotated by a random angle, so shapes drawn in (u, v) come out
    randomly oriented. ``dens`` holds the four stain-density layers.
    """

    def __init__(self, rng: np.random.Generator, mpp: float, radius_um: float) -> None:
        self.rng = rng
        self.mpp = mpp
        half = math.ceil(radius_um / mpp) + 2
        n = 2 * half + 1
        self.shape = (n, n)
        axis = (np.arange(n, dtype=np.float32) - half) * np.float32(mpp)
        self.x = axis[None, :]
        self.y = axis[:, None]
        ang = rng.uniform(0.0, _TWO_PI)
        c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        self.u = c * self.x + s * self.y
        self.v = c * self.y - s * self.x
        self.dens = np.zeros((4, n, n), dtype=np.float32)

    def cover(self, sdf: np.ndarray) -> np.ndarray:
        return _cover(sdf, self.mpp)

    def noise(self, sigma_um: float) -> np.ndarray:
        return _noise(self.shape, sigma_um / self.mpp, self.rng)

    def dots(self, region: np.ndarray, n: int, radius_um: float, w_lo: float, w_hi: float) -> np.ndarray:
        """n granules of radius ~radius_um scattered inside a boolean region, peak weight in [w_lo, w_hi]."""
        ys, xs = _sample(region, n, self.rng)
        w = self.rng.uniform(w_lo, w_hi, ys.size)
        return _dots(self.shape, ys, xs, w, radius_um / self.mpp)

    def px(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel indices → image-frame µm."""
        half = self.shape[0] // 2
        return (xs - half) * self.mpp, (ys - half) * self.mpp


class _CellRender(NamedTuple):
    dens: np.ndarray         # [4, n, n] stain densities
    alpha: np.ndarray        # [n, n] soft cell coverage, hides the background under the cell
    cell: np.ndarray         # [n, n] soft coverage of cytoplasm ∪ nucleus
    nucleus: np.ndarray      # [n, n] soft coverage of the nucleus
    hug: tuple[tuple[float, float], ...]  # centres (µm, image frame) of red cells the cell wraps around


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
              cyto: dict[int, np.ndarray | float]) -> tuple[np.ndarray, np.ndarray]:
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
    """Segmented nucleus: lobes along a curling path, joined by thin chromatin strands."""
    rng = cv.rng
    heading = rng.uniform(0.0, _TWO_PI)
    turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
    pts = [np.zeros(2)]
    heads = [heading]
    for _ in range(n_lobes - 1):
        heading += turn + rng.normal(0.0, 0.35)
        step = lobe_r * rng.uniform(2.3, 3.2)
        pts.append(pts[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
        heads.append(heading)
    p = np.array(pts)
    p -= 0.5 * (p.max(axis=0) + p.min(axis=0))
    p = _fit(p, lobe_r * 1.25, fit_r)
    sdf = None
    for (cx, cy), h in zip(p, heads, strict=True):
        r = lobe_r * rng.uniform(0.85, 1.1)
        lobe = _blob(rng, r, aspect=rng.uniform(1.1, 1.6), irregular=0.06, kmax=4, cx=cx, cy=cy,
                     angle=h + math.pi / 2 + rng.normal(0.0, 0.4)).sdf(cv.u, cv.v)
        sdf = lobe if sdf is None else np.minimum(sdf, lobe)
    for i in range(n_lobes - 1):
        # Mostly thread-thin filaments; sometimes a broader isthmus (less mature cells).
        w = rng.uniform(0.15, 0.3) if rng.random() < 0.8 else lobe_r * rng.uniform(0.35, 0.5)
        strand = _path_sdf(cv.u, cv.v, p[i:i + 2], np.array([w, w]))
        sdf = _smin(sdf, strand, 0.2)
    return sdf


def _bilobed_nucleus(cv: _Canvas, lobe_r: float, gap: float, bridge: float, fit_r: float,
                     centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Two round lobes joined by a bridge of radius ``bridge`` (µm): the 'spectacle' shape."""
    rng = cv.rng
    r1 = lobe_r * rng.uniform(0.9, 1.1)
    r2 = lobe_r * rng.uniform(0.85, 1.05)
    half = 0.5 * (r1 + r2 + gap)
    half = min(half, fit_r - max(r1, r2))
    ang = rng.uniform(0.0, _TWO_PI)
    d = np.array([math.cos(ang), math.sin(ang)]) * half
    c = np.array(centre)
    l1 = _blob(rng, r1, aspect=rng.uniform(1.0, 1.25), irregular=0.05, kmax=4, cx=c[0] + d[0], cy=c[1] + d[1])
    l2 = _blob(rng, r2, aspect=rng.uniform(1.0, 1.25), irregular=0.05, kmax=4, cx=c[0] - d[0], cy=c[1] - d[1])
    sdf = np.minimum(l1.sdf(cv.u, cv.v), l2.sdf(cv.u, cv.v))
    # The bridge bows a little, as the thin chromatin thread is rarely straight.
    bow = np.array([-d[1], d[0]]) * rng.normal(0.0, 0.15)
    path = np.stack([c + d, c + bow, c - d])
    return _smin(sdf, _path_sdf(cv.u, cv.v, path, np.full(3, bridge)), 0.25)


def _band_nucleus(cv: _Canvas, fit_r: float) -> np.ndarray:
    """Unsegmented curved sausage of even width: C, U or (rarely) S shape."""
    rng = cv.rng
    half_w = rng.uniform(0.8, 1.15)
    pts = _curve(rng, rng.uniform(9.0, 13.0), rng.uniform(2.6, 4.3), n=10, s_shape=rng.random() < 0.2)
    pts = _fit(pts, half_w, fit_r)
    radii = half_w * (1.0 + 0.07 * rng.standard_normal(pts.shape[0]))
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
    fit_r = cell_r - 1.1
    if nucleus == "lobed":
        n_lobes = int(rng.choice([2, 3, 4, 5], p=[0.07, 0.43, 0.38, 0.12]))
        nuc = _lobed_nucleus(cv, n_lobes, rng.uniform(1.35, 1.75), fit_r)
    elif nucleus == "band":
        nuc = _band_nucleus(cv, fit_r)
    elif rng.random() < 0.62:   # pseudo-Pelger, spectacle form
        nuc = _bilobed_nucleus(cv, rng.uniform(1.6, 2.1), rng.uniform(0.5, 1.9), rng.uniform(0.15, 0.3), fit_r)
    else:                       # pseudo-Pelger, round or peanut (non-segmented) form
        r = rng.uniform(2.0, 2.6)
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


def _pseudo_pelger(rng: np.random.Generator, mpp: float) -> _CellRender:
    g = rng.uniform(0.05, 0.4) if rng.random() < 0.5 else rng.uniform(0.7, 1.0)
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
    nuc = _bilobed_nucleus(cv, rng.uniform(1.7, 2.2), rng.uniform(0.6, 2.2), rng.uniform(0.2, 0.45), cell_r - 1.3)
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


def _check_type(cell_type: str) -> None:
    if cell_type not in _BUILDERS:
        raise ValueError(f"unknown cell type {cell_type!r}; valid types: {', '.join(CELL_TYPES)}")


def _densities_to_od(dens: np.ndarray, stain: Stain) -> np.ndarray:
    """[4, h, w] densities → float32 [h, w, 3] OD."""
    k, h, w = dens.shape
    return (dens.reshape(k, h * w).T @ stain.matrix()).reshape(h, w, 3).astype(np.float32, copy=False)


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


# --------------------------------------------------------------------------------------------
# Background: red cells, platelets, stain precipitate
# --------------------------------------------------------------------------------------------

_RBC_DIAMETER = 7.5   # µm
_RBC_SPACING = 8.5    # µm between lattice neighbours at rbc_density 1: a monolayer with small gaps


_RBC_D_STEP = 0.2       # µm: red-cell templates are drawn for diameters on this grid,
_RBC_ASPECT_STEP = 0.04  # for these elongations,
_RBC_N_ANGLES = 12       # and these orientations over 180°.


@lru_cache(maxsize=4096)
def _rbc_template(mpp: float, d_idx: int, a_idx: int, ang_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """A red cell on an odd square patch centred on its middle pixel, as two float32 maps:
    (body, pallor); a red cell of haemoglobin density h and central pallor p adds h·(body − p·pallor).

    Drawing every cell from scratch costs ~25 numpy calls; a cached template on a quantised
    (diameter, elongation, angle) grid makes large tiles cheap and is invisible at this step size.
    """
    radius = d_idx * _RBC_D_STEP / 2.0 / mpp
    aspect = 1.0 + a_idx * _RBC_ASPECT_STEP
    angle = ang_idx * math.pi / _RBC_N_ANGLES
    a = radius * math.sqrt(aspect)
    b = radius / math.sqrt(aspect)
    half = int(a + 2)
    d = np.arange(-half, half + 1, dtype=np.float64)
    dx, dy = d[None, :], d[:, None]
    c, s = math.cos(angle), math.sin(angle)
    p = (c * dx + s * dy) / a
    q = (c * dy - s * dx) / b
    rho2 = p * p + q * q
    edge = np.clip((1.0 - np.sqrt(rho2)) * radius + 0.5, 0.0, 1.0)
    # Thick rim, thin centre (central pallor ~1/3 of the diameter), a touch darker at the very edge.
    body = ((1.0 + 0.08 * rho2 ** 3) * edge).astype(np.float32)
    pallor = (np.exp(-16.0 * rho2 * rho2) * edge).astype(np.float32)
    body.setflags(write=False)
    pallor.setflags(write=False)
    return body, pallor


def _draw_rbcs(layer: np.ndarray, pts: np.ndarray, rng: np.random.Generator, mpp: float) -> None:
    """Add red cells (eosin density) at pts [n, 2] (x, y px) into ``layer`` [H, W], each with its own
    size, shape, haemoglobin content and pallor."""
    n = pts.shape[0]
    if n == 0:
        return
    d_idx = np.rint(np.clip(rng.normal(_RBC_DIAMETER, 0.45, n), 6.2, 9.0) / _RBC_D_STEP).astype(int)
    a_idx = np.rint(np.abs(rng.normal(0.0, 0.05, n)) / _RBC_ASPECT_STEP).clip(0, 4).astype(int)
    ang_idx = rng.integers(0, _RBC_N_ANGLES, n) * (a_idx > 0)   # a round cell has no orientation
    density = rng.uniform(0.6, 0.8, n)
    pallor = rng.uniform(0.4, 0.7, n)
    xs = np.rint(pts[:, 0]).astype(int)
    ys = np.rint(pts[:, 1]).astype(int)
    H, W = layer.shape
    for i in range(n):
        body, pal = _rbc_template(mpp, int(d_idx[i]), int(a_idx[i]), int(ang_idx[i]))
        half = body.shape[0] // 2
        y0, x0 = ys[i] - half, xs[i] - half
        ty = slice(max(-y0, 0), min(H - y0, body.shape[0]))
        tx = slice(max(-x0, 0), min(W - x0, body.shape[1]))
        if ty.start >= ty.stop or tx.start >= tx.stop:
            continue
        patch = body[ty, tx] - np.float32(pallor[i]) * pal[ty, tx]
        layer[y0 + ty.start:y0 + ty.stop, x0 + tx.start:x0 + tx.stop] += np.float32(density[i]) * patch


def _rbc_positions(shape: tuple[int, int], rng: np.random.Generator, mpp: float,
                   rbc_density: float) -> np.ndarray:
    """Red-cell centres [n, 2] (x, y px): a jittered, randomly rotated hexagonal packing with gaps,
    plus a few cells sliding over a neighbour."""
    H, W = shape
    spacing = _RBC_SPACING / math.sqrt(rbc_density) / mpp
    margin = _RBC_DIAMETER / mpp
    reach = 0.5 * math.hypot(H, W) + margin
    n = int(reach / spacing) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    gx = (i + 0.5 * (j % 2)) * spacing
    gy = j * spacing * (math.sqrt(3) / 2)
    ang = rng.uniform(0.0, math.pi)
    c, s = math.cos(ang), math.sin(ang)
    pts = np.stack([c * gx - s * gy, s * gx + c * gy], axis=-1).reshape(-1, 2)
    pts += rng.uniform(0.0, spacing, 2) + np.array([W / 2, H / 2])
    pts += rng.normal(0.0, 0.16 * spacing, pts.shape)
    keep = (pts[:, 0] > -margin) & (pts[:, 0] < W + margin) & (pts[:, 1] > -margin) & (pts[:, 1] < H + margin)
    pts = pts[keep]
    pts = pts[rng.random(pts.shape[0]) > 0.12]            # gaps in the monolayer
    extra = pts[rng.random(pts.shape[0]) < 0.06]           # overlapping pairs
    if extra.size:
        ang2 = rng.uniform(0.0, _TWO_PI, extra.shape[0])
        d = rng.uniform(0.45, 0.8, extra.shape[0]) * _RBC_DIAMETER / mpp
        extra = extra + np.stack([np.cos(ang2) * d, np.sin(ang2) * d], axis=-1)
        pts = np.concatenate([pts, extra])
    return pts


def _keep_out(pts: np.ndarray, keep_out: tuple[float, float, float], rng: np.random.Generator,
              r_rbc: float) -> np.ndarray:
    """Red cells mostly avoid the disc: some are dropped, some pushed out to just touch or nick it."""
    cx, cy, r = keep_out
    dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
    dist = _hyp(dx, dy) + 1e-6
    inside = dist < r + 0.6 * r_rbc
    push = inside & (rng.random(pts.shape[0]) < 0.4)
    target = r + rng.uniform(0.75, 1.05, pts.shape[0]) * r_rbc
    scale = np.where(push, target / dist, 1.0)
    out = np.stack([cx + dx * scale, cy + dy * scale], axis=-1)
    return out[~inside | push]


def _draw_platelet(od: np.ndarray, cx: float, cy: float, rng: np.random.Generator, stain: Stain,
                   mpp: float) -> None:
    """A 2–3 µm platelet: pale lilac hyalomere with a granular purple centre."""
    r = rng.uniform(0.9, 1.6)
    blob = _blob(rng, r, aspect=rng.uniform(1.0, 1.5), irregular=0.12, kmax=5)
    half = int(blob.extent() / mpp) + 2
    n = 2 * half + 1
    axis = (np.arange(n, dtype=np.float32) - half) * np.float32(mpp)
    sdf = blob.sdf(axis[None, :], axis[:, None])
    cov = _cover(sdf, mpp)
    grains = np.maximum(_noise((n, n), 0.3 / mpp, rng) + 0.3, 0.0) * np.clip(-sdf / (0.5 * r), 0.0, 1.0)
    dens = np.stack([0.55 * grains, 0.12 * cov, 0.0 * cov, (0.3 + 0.5 * grains) * cov])
    _add_patch(od, _densities_to_od(dens, stain), round(float(cx)), round(float(cy)))


def _draw_precipitate(od: np.ndarray, cx: float, cy: float, rng: np.random.Generator, stain: Stain,
                      mpp: float) -> None:
    """Stain precipitate: a small cluster of sharp, very dark blue-violet specks."""
    k = int(rng.integers(1, 7))
    half = int(2.5 / mpp) + 2
    n = 2 * half + 1
    axis = (np.arange(n, dtype=np.float32) - half) * np.float32(mpp)
    x, y = axis[None, :], axis[:, None]
    cov = np.zeros((n, n), dtype=np.float32)
    for px, py, pr in zip(rng.normal(0, 0.8, k), rng.normal(0, 0.8, k), rng.uniform(0.15, 0.6, k), strict=True):
        cov = np.maximum(cov, _cover(_hyp(x - px, y - py) - pr, mpp))
    dens = np.stack([1.3 * cov, 0.9 * cov, 0.0 * cov, 0.2 * cov])
    _add_patch(od, _densities_to_od(dens, stain), round(float(cx)), round(float(cy)))


def _add_patch(od: np.ndarray, patch: np.ndarray, cx: int, cy: int) -> None:
    """Add an odd-sized OD patch centred at (cx, cy), clipped to the image."""
    h, w = patch.shape[:2]
    y0, x0 = cy - h // 2, cx - w // 2
    ys = slice(max(y0, 0), min(y0 + h, od.shape[0]))
    xs = slice(max(x0, 0), min(x0 + w, od.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        od[ys, xs] += patch[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


def render_background_od(shape: tuple[int, int], rng: np.random.Generator, stain: Stain, mpp: float = 0.25,
                         rbc_density: float = 1.0, keep_out: tuple[float, float, float] | None = None) -> np.ndarray:
    """Red cells (≈7.5 µm pink discs with pale central pallor, some overlapping each other), a few platelets
    (2–3 µm purple granular dots), occasional stain precipitate, over the background tint. float32 [H, W, 3] OD.
    keep_out = (cx, cy, r) px: red cells mostly avoid this disc (a white cell sits there; a little overlap at the edge is realistic).

    ``shape`` is (H, W) px, ``mpp`` µm per pixel, ``rbc_density`` scales the number of red cells per area
    (1 = a well-spread monolayer, lower for anaemia or the thin end of the smear, 0 = none).
    """
    H, W = shape
    if H <= 0 or W <= 0:
        raise ValueError(f"shape must be positive, got {shape}")
    area = H * W * mpp * mpp   # µm²
    # Glass/plasma tint with a faint, slow unevenness (stain thickness across the field).
    tint = 1.0 + 0.25 * _noise((H, W), 12.0 / mpp, rng)
    od = tint[..., None] * stain.background_od
    eos = np.zeros((H, W), dtype=np.float32)
    if rbc_density > 0:
        pts = _rbc_positions((H, W), rng, mpp, rbc_density)
        if keep_out is not None:
            pts = _keep_out(pts, keep_out, rng, _RBC_DIAMETER / 2 / mpp)
        _draw_rbcs(eos, pts, rng, mpp)
    od += eos[..., None] * stain.eosin_od
    for x, y in rng.uniform(0.0, 1.0, (rng.poisson(area / 650.0), 2)) * (W, H):
        _draw_platelet(od, x, y, rng, stain, mpp)
    for x, y in rng.uniform(0.0, 1.0, (rng.poisson(area / 5000.0), 2)) * (W, H):
        _draw_precipitate(od, x, y, rng, stain, mpp)
    return od.astype(np.float32, copy=False)


def compose(od: np.ndarray, rng: np.random.Generator, stain: Stain) -> np.ndarray:
    """OD → RGB uint8 [H, W, 3] (255·exp(-od)), then focus blur (stain.blur_sigma) and noise (stain.noise_sd).

    Blur acts on light intensity, as defocus does in the microscope; noise is added last, like the sensor.
    """
    rgb = np.exp(-np.asarray(od, dtype=np.float32)) * np.float32(255.0)
    if stain.blur_sigma > 0:
        rgb = ndi.gaussian_filter(rgb, (stain.blur_sigma, stain.blur_sigma, 0.0), truncate=3.0)
    if stain.noise_sd > 0:
        rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(stain.noise_sd)
    return np.clip(rgb + 0.5, 0.0, 255.0).astype(np.uint8)


def render_crop(cell_type: str, rng: np.random.Generator, stain: Stain, size: int = 96,
                mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A single-cell crop as a CellaVision-style export: background + one white cell at the centre (small random
    offset ≤ 2 µm and random rotation). mpp defaults to 24 µm / size (so the crop always spans 24 µm).
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
    return compose(od, rng, stain), nucleus


def _paste_mask(dst: np.ndarray, mask: np.ndarray, cx: int, cy: int) -> None:
    h, w = mask.shape
    y0, x0 = cy - h // 2, cx - w // 2
    ys = slice(max(y0, 0), min(y0 + h, dst.shape[0]))
    xs = slice(max(x0, 0), min(x0 + w, dst.shape[1]))
    if ys.start < ys.stop and xs.start < xs.stop:
        dst[ys, xs] |= mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
