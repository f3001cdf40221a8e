"""Geometric and noise primitives shared by the cell and background renderers.

Shapes are signed distance fields in µm (negative inside), so every size is set in µm and the
pixel size ``mpp`` (µm per pixel) only enters when the fields are sampled: :func:`_cover` turns a
field into anti-aliased pixel coverage. Also here: smooth Gaussian noise, Gaussian dots (granules),
random sampling inside a mask, and :class:`_Canvas`, the square µm/pixel working area of one cell.

All randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

_TWO_PI = 2.0 * math.pi


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
