"""Calibrating a smear image from its own pixels: white point, illumination, optical density, stains.

Optical density (OD, natural-log absorbance) is only meaningful against the light that reaches the
camera through empty glass. That white is 255 on a well-set slide scanner, but a microscope camera
gives anything from ~150 to ~250 per channel, often tinted (yellow lamp, no white balance) and
darker towards the corners (vignetting). Stains differ by lab too (MGG, Wright, Wright-Giemsa, rapid
stains). So every threshold milhema applies to a smear is taken relative to what this module
measures on the image itself:

- **white point** (:func:`white_point`): per channel, the median of the pixels in the brightest
  well-populated mode of the brightness histogram, i.e. the glass between the red cells; robust to
  fields dense with red cells, where the glass is a minority but still the brightest population;
- **illumination** (:func:`illumination`): vignetting as a radial falloff ``exp(-a r²)`` around the
  field's centre, fitted to the upper envelope of the brightness of blocks of the field (so that
  cells, darker than the glass, do not pull it), applied only when it darkens the corners;
- **stain vectors** (:func:`estimate_stains`): the nuclear stain (purple: azure / methylene blue)
  and eosin (red cells) as unit OD vectors, estimated Macenko-style by ``torchstain`` on the
  stained pixels;
- **thresholds**: a pixel is stained when its OD is well above the noise of the glass
  (``stained_od``), and chromatin when its OD along the nuclear stain vector is above the Otsu
  split of the stained pixels (``nucleus_od``).

A whole slide is calibrated once from windows sampled over level 0 (:func:`calibrate` on a list
of images); a camera field, or a single-cell crop, from itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from milhema.errors import MilhemaError

# Typical MGG unit OD vectors (R, G, B), used only when an image has too few stained pixels to
# estimate its own (an empty field): dense chromatin ~(95, 52, 134), red cells ~(235, 147, 137).
_DEFAULT_NUCLEAR = (0.531, 0.785, 0.318)
_DEFAULT_EOSIN = (0.061, 0.660, 0.749)
_MIN_STAINED_PX = 200          # fewer stained pixels than this: keep the default stain vectors
_MAX_PIXELS = 400_000          # statistics are computed on at most this many pixels (strided)
_MODE_HALF_WIDTH = 4           # grey levels either side of the glass's brightness mode
_MIN_MODE_SHARE = 0.02         # the glass's mode must hold at least this share of the pixels
_STAINED_NOISE_SD = 6.0        # a pixel is stained above this many noise sd of the glass ...
_MIN_STAINED_OD = 0.05         # ... and never below 5 % absorbance (8-bit quantisation, JPEG)
_MIN_FALLOFF = 0.02            # vignetting weaker than 2 % at the corners is left alone


class CalibrationError(MilhemaError):
    """An image cannot be calibrated (it is empty or not RGB)."""


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured on one slide or field.

    ``white``: RGB (0–255) of the empty glass; ``nuclear`` and ``eosin``: unit OD vectors (R, G, B)
    of the two stains; ``nucleus_od``: OD along ``nuclear`` above which a pixel is chromatin;
    ``stained_od``: OD norm above which a pixel is stained at all; ``noise_od``: robust sd of the
    glass's OD; ``mpp``: µm per pixel of the image it was measured on; ``pixels``: how many pixels.
    """

    white: tuple[float, float, float]
    nuclear: tuple[float, float, float]
    eosin: tuple[float, float, float]
    nucleus_od: float
    stained_od: float
    noise_od: float
    mpp: float
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, rounded (what the detection JSON and the bag attributes record)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, (tuple, list)):
                out[key] = [round(float(v), 4) for v in value]
            elif isinstance(value, float):
                out[key] = round(value, 5)
            else:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """The inverse of :meth:`to_dict`.

        Raises:
            CalibrationError: a key is missing or a value is not a number.
        """
        try:
            return cls(white=_triple(data["white"]), nuclear=_triple(data["nuclear"]), eosin=_triple(data["eosin"]),
                       nucleus_od=float(data["nucleus_od"]), stained_od=float(data["stained_od"]),
                       noise_od=float(data["noise_od"]), mpp=float(data["mpp"]), pixels=int(data["pixels"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"not a stain calibration ({type(exc).__name__}: {exc})") from None

    @property
    def white_array(self) -> np.ndarray:
        """float32 [3]."""
        return np.asarray(self.white, np.float32)


def _triple(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _check(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise CalibrationError(f"expected an RGB image [H, W, 3], got shape {tuple(rgb.shape)}")
    return rgb


def _sample(pixels: np.ndarray) -> np.ndarray:
    """At most :data:`_MAX_PIXELS` rows, evenly strided (deterministic)."""
    step = max(1, -(-len(pixels) // _MAX_PIXELS))
    return pixels[::step]


def _glass_mode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(white float32 [3], mask of the pixels in the glass's brightness mode) of RGB rows [n, 3]."""
    brightness = pixels.mean(axis=1)
    levels = np.clip(np.rint(brightness), 0, 255).astype(np.int64)
    hist = np.bincount(levels, minlength=256).astype(np.float64)
    smooth = ndi.gaussian_filter1d(hist, 2.0)
    need = max(_MIN_MODE_SHARE * len(pixels), 20.0)
    mode = None
    # The brightest peak that holds enough pixels: the glass is the brightest large population even
    # where red cells cover most of the field (their pale centres are darker than the glass).
    for level in range(254, 0, -1):
        if smooth[level] >= smooth[level - 1] and smooth[level] >= smooth[level + 1] and smooth[level] > 0:
            lo, hi = max(0, level - _MODE_HALF_WIDTH), min(256, level + _MODE_HALF_WIDTH + 1)
            if hist[lo:hi].sum() >= need:
                mode = level
                break
    if smooth[255] > smooth[254] and hist[255 - _MODE_HALF_WIDTH:].sum() >= need:
        mode = 255   # saturated glass
    if mode is None:
        mode = int(np.percentile(levels, 99))
    inside = np.abs(brightness - mode) <= _MODE_HALF_WIDTH
    if not inside.any():
        inside = levels >= mode
    white = np.median(pixels[inside], axis=0).astype(np.float32)
    return np.maximum(white, 1.0), inside


def _flattened(rgb: np.ndarray, flat_field: bool) -> np.ndarray:
    """float32 RGB [H, W, 3] with the vignetting divided out (the image itself without it)."""
    image = rgb.astype(np.float32)
    if flat_field:
        # The falloff's shape does not depend on the white's level: fit it before the white is known.
        image /= illumination(rgb, np.full(3, float(rgb.mean()), np.float32))[..., None]
    return image


def white_point(rgb: np.ndarray, flat_field: bool = True) -> np.ndarray:
    """RGB of the empty glass at the field's centre, float32 [3] in 0–255, from an RGB uint8
    image [H, W, 3] (vignetting divided out first, so the glass is one mode of brightness)."""
    pixels = _sample(_flattened(_check(rgb), flat_field).reshape(-1, 3))
    return _glass_mode(pixels)[0]


def illumination(rgb: np.ndarray, white: np.ndarray, grid: int = 8) -> np.ndarray:
    """Relative illumination float32 [H, W] (1 at the centre, < 1 towards vignetted corners).

    The brightness of each of ``grid`` × ``grid`` blocks is its 95th percentile (the glass, where the
    block has any); ``log(brightness) = c - a r²`` (r: distance to the centre over the half diagonal)
    is fitted to the upper envelope of the blocks (blocks well below the fit hold no glass and are
    dropped, a few rounds). A lamp or lens darkens the corners, never the centre, so ``a`` is kept
    ≥ 0; below :data:`_MIN_FALLOFF` the image is returned as evenly lit (all ones).
    """
    h, w = _check(rgb).shape[:2]
    ones = np.ones((h, w), np.float32)
    if min(h, w) < 4 * grid:
        return ones
    brightness = rgb.astype(np.float32).mean(axis=2)
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    values, radii = [], []
    half_diagonal = math.hypot(h / 2, w / 2)
    for i in range(grid):
        for j in range(grid):
            block = brightness[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            values.append(np.percentile(block, 95))
            cy, cx = (ys[i] + ys[i + 1]) / 2 - h / 2, (xs[j] + xs[j + 1]) / 2 - w / 2
            radii.append((cy * cy + cx * cx) / half_diagonal**2)
    y = np.log(np.maximum(np.array(values), 1.0) / float(np.mean(white)))
    r2 = np.array(radii)
    keep = np.ones(len(y), bool)
    a = 0.0
    for _ in range(5):
        design = np.stack([np.ones(int(keep.sum())), -r2[keep]], axis=1)
        c, a = np.linalg.lstsq(design, y[keep], rcond=None)[0]
        a = max(float(a), 0.0)
        c = float(np.mean(y[keep] + a * r2[keep]))
        residual = y - (c - a * r2)
        spread = max(1.4826 * float(np.median(np.abs(residual[keep] - np.median(residual[keep])))), 0.01)
        new_keep = residual > -2.5 * spread
        if new_keep.sum() < len(y) // 4 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    if 1.0 - math.exp(-a) < _MIN_FALLOFF:
        return ones
    yy = (np.arange(h, dtype=np.float32) - h / 2 + 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) - w / 2 + 0.5)[None, :]
    return np.exp(-a * (yy * yy + xx * xx) / np.float32(half_diagonal**2)).astype(np.float32)


def optical_density(rgb: np.ndarray, white: np.ndarray | Sequence[float], gain: np.ndarray | None = None) -> np.ndarray:
    """OD float32 [H, W, 3] of an RGB uint8 image against ``white`` (RGB 0–255, float [3]), with an
    optional illumination ``gain`` [H, W] (:func:`illumination`). Pixels brighter than the white
    have OD 0."""
    light = np.asarray(white, np.float32).reshape(1, 1, 3)
    if gain is not None:
        light = light * gain[..., None]
    od = np.log(light / (rgb.astype(np.float32) + 0.5))
    return np.maximum(od, 0.0, out=od)


def estimate_stains(od: np.ndarray, white: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit OD vectors (nuclear, eosin), float64 [3] each, of stained pixels ``od`` [n, 3].

    Macenko's method as implemented by torchstain (plane of the two main eigenvectors of the OD,
    the extreme angles within it): of the two vectors, the one absorbing more red light is the
    nuclear stain (azure / methylene blue absorbs red; eosin barely does). Falls back to typical
    MGG vectors when there are fewer than :data:`_MIN_STAINED_PX` stained pixels.
    """
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    if len(od) < _MIN_STAINED_PX:
        return np.array(_DEFAULT_NUCLEAR), np.array(_DEFAULT_EOSIN)
    # torchstain computes OD as -ln((I + 1) / Io): hand it intensities that give back exactly ``od``.
    intensities = white.reshape(1, 3).astype(np.float64) * np.exp(-od.astype(np.float64)) - 1.0
    normalizer = NumpyMacenkoNormalizer()
    try:
        normalizer.fit(intensities.reshape(-1, 1, 3), Io=white.astype(np.float64), alpha=1, beta=0.0)
    except (np.linalg.LinAlgError, ValueError):
        return np.array(_DEFAULT_NUCLEAR), np.array(_DEFAULT_EOSIN)
    vectors = np.asarray(normalizer.HERef, np.float64).T    # [2, 3]: nuclear first (larger red OD)
    out = []
    for vector, default in zip(vectors, (_DEFAULT_NUCLEAR, _DEFAULT_EOSIN), strict=True):
        if vector.sum() < 0:   # an eigenvector's sign is arbitrary; stains absorb
            vector = -vector
        norm = float(np.linalg.norm(vector))
        out.append(vector / norm if np.isfinite(norm) and norm > 0 else np.array(default))
    return out[0], out[1]


def calibrate(images: np.ndarray | Sequence[np.ndarray], mpp: float, flat_field: bool = True) -> Calibration:
    """Calibrate a slide or field from its own pixels.

    Args:
        images: one RGB uint8 image [H, W, 3] (a camera field, a crop) or several windows of one
            slide (pooled).
        mpp: µm per pixel of the images (recorded).
        flat_field: correct each image's vignetting (:func:`illumination`) before measuring.

    Returns the :class:`Calibration`: white point, stain vectors and the thresholds derived from them.
    """
    windows = [_check(np.asarray(images))] if isinstance(images, np.ndarray) else [_check(i) for i in images]
    if not windows:
        raise CalibrationError("no image to calibrate")
    pixels = _sample(np.concatenate([_flattened(w, flat_field).reshape(-1, 3) for w in windows]))
    white, glass = _glass_mode(pixels)
    glass_od = np.log(white[None, :] / (pixels[glass] + 0.5))
    noise = float(np.sqrt(np.sum((1.4826 * np.median(np.abs(glass_od - np.median(glass_od, axis=0)), axis=0)) ** 2)))
    stained_od = max(_STAINED_NOISE_SD * noise, _MIN_STAINED_OD)
    ods = [optical_density(w, white, illumination(w, white) if flat_field else None).reshape(-1, 3) for w in windows]
    od = _sample(np.concatenate(ods))
    stained = od[np.linalg.norm(od, axis=1) > stained_od]
    nuclear, eosin = estimate_stains(stained, white)
    projection = stained @ nuclear
    nucleus_od = 2.0 * stained_od
    if len(projection) >= _MIN_STAINED_PX and projection.min() < projection.max():
        # Chromatin is the densest nuclear-stained material: Otsu's split of the stained pixels
        # along the nuclear stain separates it from cytoplasm, red cells and pale platelets (on a
        # whole slide, where it may fall among dense red cells, the detector also asks for the hue
        # of chromatin rather than that of the slide's red cells: milhema.slides.detect).
        nucleus_od = max(float(threshold_otsu(projection)), nucleus_od)
    return Calibration(white=_triple(white), nuclear=_triple(nuclear), eosin=_triple(eosin),
                       nucleus_od=nucleus_od, stained_od=stained_od, noise_od=noise, mpp=float(mpp),
                       pixels=int(sum(w.shape[0] * w.shape[1] for w in windows)))
