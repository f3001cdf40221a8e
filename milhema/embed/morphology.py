"""Handcrafted cytomorphology features of one single-cell crop (scikit-image).

The central cell is segmented in optical-density (OD) space, where stains add up: the nucleus is
what is dark in both red and green light (chromatin, violet). The cytoplasm is told apart from the
red cells around it by colour, with references taken from the crop itself rather than fixed hues
(stains and cameras differ too much for one rule: a camera's pink-orange neutrophil cytoplasm has
the hue a scanner gives red cells). See :func:`segment_cell`. Areas are in µm² using the crop's
microns per pixel, so crops from different scanners are comparable.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology

from milhema.slides.calibrate import Calibration, white_point
from milhema.slides.calibrate import optical_density as calibrated_od

MORPHOLOGY_FEATURES: tuple[str, ...] = (
    "cell_area_um2",          # nucleus + cytoplasm of the central cell
    "nucleus_area_um2",
    "nc_ratio",               # nucleus area / cell area
    "nucleus_lobes",          # lobes once thin strands are cut (segmented neutrophils: 3-5)
    "nucleus_solidity",       # area / convex-hull area (lobed and folded nuclei are low)
    "nucleus_roundness",      # 4π area / perimeter² (1 = disc)
    "nucleus_eccentricity",
    "nucleus_od_r", "nucleus_od_g", "nucleus_od_b",
    "cytoplasm_od_r", "cytoplasm_od_g", "cytoplasm_od_b",
    "chromatin_texture",      # sd of OD inside the nucleus (clumped vs fine chromatin)
    "granularity",            # mean |Laplacian of Gaussian| of OD in the cytoplasm
    "vacuole_count",          # clear holes of 0.15-6 µm² enclosed by the cytoplasm
)
_MAX_CELL_RADIUS_UM = 12.0
# Cytoplasm: stained is a summed OD above this (pale cytoplasm starts at ~0.1-0.2, the glass is ~0
# against the calibrated white); the cell's own colour is read in a ring _RING_UM (inner, outer) from
# the nucleus -- not touching it: the blurred edge of the chromatin is darker than any cytoplasm and
# made pale neutrophil cytoplasm read as a neighbour -- the neighbours' (red cells) beyond _FAR_UM.
_STAINED_OD = 0.15
_RING_UM = (0.5, 1.5)
_FAR_UM = 6.0
# Colour space of the two references: chromaticity (red and blue shares of the OD, 0-1) beside
# this weight × log density; references nearer than _SAME_COLOUR in it are one colour.
_LOG_DENSITY_WEIGHT = 0.3
_SAME_COLOUR = 0.1
# Bumped whenever a feature's definition changes, so bags made before are not mixed with new ones.
# 3: optical densities against the image's (or slide's) own white point, not 255.
# 4: a crop folder's cells against the white of a sample of its crops (one per slide), not each crop's own.
# 5: cytoplasm by the nearer of two colour references read from the crop, not a fixed pink rule.
# 6: with stain normalisation, the cell is segmented as imaged and only its optical densities are read
# from the normalised crop (without normalisation the features are those of version 5).
MORPHOLOGY_VERSION = 6


def optical_density(rgb: np.ndarray, calibration: Calibration | None = None) -> np.ndarray:
    """Beer–Lambert absorbance ``[H, W, 3]`` float32 of an RGB uint8 image, against the slide's
    white point (``calibration``) or, without one, the white point measured on the image itself
    (:mod:`milhema.slides.calibrate`, shared with the detector)."""
    white = calibration.white_array if calibration is not None else white_point(rgb)
    return calibrated_od(rgb, white)


def segment_cell(rgb: np.ndarray, mpp: float, calibration: Calibration | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(cell, nucleus)`` bool ``[H, W]`` of the cell nearest the crop centre.

    ``calibration``: the slide's (a crop cut from a scan); ODs are taken against its white point,
    else against the crop's own.
    """
    od = optical_density(rgb, calibration)
    h, w = od.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    near = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) * mpp
    chromatin = np.minimum(od[..., 0], od[..., 1])
    threshold = max(_otsu(chromatin), 0.45)
    labels = _without_small(measure.label(chromatin > threshold), max(4, int(0.6 / mpp**2)))
    keep = np.unique(labels[(near < 6.0) & (labels > 0)])
    if keep.size == 0 and labels.max() > 0:  # off-centre cell: take the piece nearest the centre
        keep = np.array([labels.flat[np.argmin(np.where(labels > 0, near, np.inf))]])
    nucleus = np.isin(labels, keep[keep > 0])
    if not nucleus.any():
        return nucleus, nucleus
    smooth = ndi.gaussian_filter(od, sigma=(1.0, 1.0, 0.0))
    cytoplasm = _cytoplasm(smooth, nucleus, mpp)
    cy, cx = (float(v.mean()) for v in np.nonzero(nucleus))
    within = np.hypot(yy - cy, xx - cx) * mpp < _MAX_CELL_RADIUS_UM
    cell = ndi.binary_fill_holes(ndi.binary_closing((cytoplasm & within) | nucleus,
                                                    morphology.disk(max(2, round(0.3 / mpp)))))
    labels = measure.label(cell)
    cell = np.isin(labels, np.unique(labels[nucleus]))
    return cell, nucleus


def _cytoplasm(od: np.ndarray, nucleus: np.ndarray, mpp: float) -> np.ndarray:
    """Stained pixels ``[H, W]`` bool that belong with the cell of ``nucleus`` rather than its neighbours.

    ``od [H, W, 3]`` (smoothed). Colour is chromaticity (each channel's share of the OD) and log
    density. The cell's reference is the mean of the half of the ring round the nucleus least like
    the far pixels (red cells often touch the nucleus); the neighbours' is the mean of the stained
    pixels far from the nucleus. Each stained pixel goes to the nearer reference, without k-means
    iterations: iterating drifted to a split by density (pale gaps vs cells) on crowded smears.
    With too few far pixels, or references that do not differ, every stained pixel counts: a big
    cell's own cytoplasm then reaches the far zone, and there is no neighbour to refuse.
    """
    total = od.sum(axis=2)
    stained = (total > _STAINED_OD) & ~nucleus
    distance = ndi.distance_transform_edt(~nucleus) * mpp                        # µm from the nucleus
    ring = stained & (distance > _RING_UM[0]) & (distance < _RING_UM[1])
    far = stained & (distance > _FAR_UM)
    enough = max(10, int(0.3 / mpp**2))                                          # ~0.3 µm² of pixels
    if ring.sum() < enough or far.sum() < enough:
        return stained
    density = np.maximum(total, 1e-3)
    colour = np.stack([od[..., 0] / density, od[..., 2] / density, _LOG_DENSITY_WEIGHT * np.log(density)], axis=-1)
    neighbours = colour[far].mean(axis=0)
    ring_colour = colour[ring]
    gap = np.linalg.norm(ring_colour - neighbours, axis=1)
    own = ring_colour[gap >= np.median(gap)].mean(axis=0)
    if np.linalg.norm(own - neighbours) <= _SAME_COLOUR:
        return stained
    x = colour[stained]
    out = np.zeros_like(stained)
    out[stained] = np.linalg.norm(x - own, axis=1) <= np.linalg.norm(x - neighbours, axis=1)
    return out


def morphology_features(rgb: np.ndarray, mpp: float, calibration: Calibration | None = None,
                        colours: np.ndarray | None = None) -> np.ndarray:
    """The :data:`MORPHOLOGY_FEATURES` of the central cell, float32 ``[16]``.

    Args:
        rgb: uint8 ``[H, W, 3]`` crop centred on one white cell, as imaged.
        mpp: microns per pixel of the crop.
        calibration: the slide's white point (a crop cut from a scan); measured on the crop when
            not given.
        colours: the same crop after stain normalisation (uint8 ``[H, W, 3]``), or None. The cell is
            segmented on ``rgb``, calibrated against its own slide; the optical densities (colours,
            chromatin texture, granularity, vacuoles) are read from ``colours`` against its own
            white. Segmenting the normalised crop lost the cytoplasm of whole profiles: two-stain
            normalisation gives pale cytoplasm the red cells' hue, and a scan's white point no
            longer fits the normalised glass.

    Returns zeros (area 0) when no nucleus is found, so a bad crop never stops a run.
    """
    if colours is not None and colours.shape != rgb.shape:
        raise ValueError(f"colours {colours.shape} must have the crop's shape {rgb.shape}")
    cell, nucleus = segment_cell(rgb, mpp, calibration)
    out = np.zeros(len(MORPHOLOGY_FEATURES), dtype=np.float32)
    if not nucleus.any():
        return out
    od = optical_density(rgb, calibration) if colours is None else optical_density(colours)
    px_area = mpp * mpp
    cyto = cell & ~nucleus
    cell_area = float(cell.sum()) * px_area
    nuc_area = float(nucleus.sum()) * px_area
    hull = morphology.convex_hull_image(nucleus)
    perimeter = measure.perimeter(nucleus)
    props = measure.regionprops(nucleus.astype(np.uint8))[0]
    total = od.sum(axis=2)
    log = np.abs(ndi.gaussian_laplace(total, sigma=max(0.6, 0.25 / mpp)))
    out[:] = [
        cell_area,
        nuc_area,
        nuc_area / cell_area if cell_area > 0 else 1.0,
        float(_lobes(nucleus, mpp)),
        float(nucleus.sum()) / max(float(hull.sum()), 1.0),
        4.0 * np.pi * float(nucleus.sum()) / max(perimeter * perimeter, 1.0),
        float(props.eccentricity),
        *od[nucleus].mean(axis=0),
        *(od[cyto].mean(axis=0) if cyto.any() else np.zeros(3)),
        float(total[nucleus].std()),
        float(log[cyto].mean()) if cyto.any() else 0.0,
        float(_vacuoles(total, cell, nucleus, mpp)),
    ]
    return out


def _vacuoles(total_od: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, mpp: float) -> int:
    """Clear holes enclosed by the cytoplasm: 0.15-6 µm², compact, much lighter than the cytoplasm.

    Requiring the hole to lie inside the cell outline (not on it) and to be compact keeps the
    light gaps between nuclear lobes and at a ragged cell edge from counting.
    """
    cytoplasm = cell & ~nucleus
    if cytoplasm.sum() < 20:
        return 0
    level = np.median(total_od[cytoplasm])
    light = cell & ~ndi.binary_dilation(nucleus) & (total_od < 0.5 * level)
    inner = ndi.binary_erosion(cell, morphology.disk(1))
    labels = measure.label(light)
    count = 0
    for region in measure.regionprops(labels):
        area = region.area * mpp * mpp
        if 0.15 <= area <= 6.0 and region.extent >= 0.4 and inner[labels == region.label].all():
            count += 1
    return count


def _lobes(nucleus: np.ndarray, mpp: float) -> int:
    """Nuclear pieces of ≥ 1 µm² once the chromatin strands (< ~1.4 µm wide) between lobes are cut."""
    opened = ndi.binary_opening(nucleus, morphology.disk(max(1, round(0.7 / mpp))))
    labels = _without_small(measure.label(opened), max(4, int(1.0 / mpp**2)))
    return max(1, len(np.unique(labels)) - 1)


def _without_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    labels = labels.copy()
    labels[small[labels]] = 0
    return labels


def _otsu(values: np.ndarray) -> float:
    flat = values.ravel()
    if flat.min() == flat.max():
        return float(flat.min())
    return float(filters.threshold_otsu(flat))
