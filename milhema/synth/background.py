"""Blood-smear background in optical density (OD): glass/plasma tint, red cells, platelets and
stain precipitate; and :func:`compose`, which turns any OD image into a blurred, noisy RGB image.

Sizes of objects are in µm, positions and images in pixels; ``mpp`` is µm per pixel. Red cells are
drawn as eosin density and converted with the slide's :class:`~milhema.synth.stain.Stain`.
All randomness comes from the ``rng`` argument: the same seed gives byte-identical images.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from milhema.synth.shapes import _TWO_PI, _blob, _cover, _hyp, _noise
from milhema.synth.stain import Stain, _densities_to_od

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


class _RbcParams(NamedTuple):
    """Per-red-cell draw parameters (one entry per cell)."""

    d_idx: np.ndarray
    a_idx: np.ndarray
    ang_idx: np.ndarray
    density: np.ndarray
    pallor: np.ndarray

    def take(self, keep: np.ndarray) -> _RbcParams:
        return _RbcParams(*(a[keep] for a in self))


def _rbc_params(n: int, rng: np.random.Generator) -> _RbcParams:
    """Size, shape, haemoglobin content and pallor of ``n`` red cells."""
    d_idx = np.rint(np.clip(rng.normal(_RBC_DIAMETER, 0.45, n), 6.2, 9.0) / _RBC_D_STEP).astype(int)
    a_idx = np.rint(np.abs(rng.normal(0.0, 0.05, n)) / _RBC_ASPECT_STEP).clip(0, 4).astype(int)
    ang_idx = rng.integers(0, _RBC_N_ANGLES, n) * (a_idx > 0)   # a round cell has no orientation
    density = rng.uniform(0.6, 0.8, n)
    pallor = rng.uniform(0.4, 0.7, n)
    return _RbcParams(d_idx, a_idx, ang_idx, density, pallor)


def _draw_rbcs(layer: np.ndarray, pts: np.ndarray, rng: np.random.Generator, mpp: float) -> None:
    """Add red cells (eosin density) at pts [n, 2] (x, y px) into ``layer`` [H, W], each with its own
    size, shape, haemoglobin content and pallor."""
    if pts.shape[0]:
        _draw_rbcs_with(layer, pts, _rbc_params(pts.shape[0], rng), mpp)


def _draw_rbcs_with(layer: np.ndarray, pts: np.ndarray, params: _RbcParams, mpp: float) -> None:
    """Add red cells with given parameters; cells hanging over the border of ``layer`` are clipped."""
    xs = np.rint(pts[:, 0]).astype(int)
    ys = np.rint(pts[:, 1]).astype(int)
    H, W = layer.shape
    for i in range(pts.shape[0]):
        body, pal = _rbc_template(mpp, int(params.d_idx[i]), int(params.a_idx[i]), int(params.ang_idx[i]))
        half = body.shape[0] // 2
        y0, x0 = ys[i] - half, xs[i] - half
        ty = slice(max(-y0, 0), min(H - y0, body.shape[0]))
        tx = slice(max(-x0, 0), min(W - x0, body.shape[1]))
        if ty.start >= ty.stop or tx.start >= tx.stop:
            continue
        patch = body[ty, tx] - np.float32(params.pallor[i]) * pal[ty, tx]
        layer[y0 + ty.start:y0 + ty.stop, x0 + tx.start:x0 + tx.stop] += np.float32(params.density[i]) * patch


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


def compose(od: np.ndarray, rng: np.random.Generator, stain: Stain, light: np.ndarray | None = None) -> np.ndarray:
    """OD → RGB uint8 [H, W, 3] (255·exp(-od)), then focus blur (stain.blur_sigma) and noise (stain.noise_sd).

    ``light`` (float32 [H, W, 3] or [3], 0-255 units) is the light reaching each pixel through clean
    glass: a tinted or dim lamp, vignetting (:class:`~milhema.synth.acquisition.Illumination`);
    ``None`` is a white lamp of 255. Blur acts on light intensity, as defocus does in the microscope;
    noise is added last, like the sensor.
    """
    if light is None:
        rgb = np.exp(-np.asarray(od, dtype=np.float32)) * np.float32(255.0)
    else:
        rgb = np.exp(-np.asarray(od, dtype=np.float32)) * np.asarray(light, dtype=np.float32)
    if stain.blur_sigma > 0:
        rgb = ndi.gaussian_filter(rgb, (stain.blur_sigma, stain.blur_sigma, 0.0), truncate=3.0)
    if stain.noise_sd > 0:
        rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(stain.noise_sd)
    return np.clip(rgb + 0.5, 0.0, 255.0).astype(np.uint8)
