"""White-cell detection on whole-slide smears, without ever loading level 0 whole.

0. Calibration (:mod:`milhema.slides.calibrate`): the slide's white point, stain vectors and
   thresholds are measured on windows sampled over level 0 (a camera field: on itself), so that
   optical densities are taken against this slide's glass, whatever its lamp, tint and stain.
1. Candidates: a low-resolution level (~1–2 µm/px) is read in chunks; pixels dense along the
   slide's nuclear-stain vector (chromatin) mark the level-0 tiles worth a closer look.
2. Refinement: each marked tile (1024 px plus a margin that holds any white cell) is read at level 0
   in a worker process and segmented by :func:`segment_regions`: vignetting is corrected, chromatin
   is OD along the nuclear stain above the slide's threshold, and the cell body is what is stained
   along the nuclear stain once the red cells' eosin (measured on this tile's red cells) is taken
   out; an object is cut by a watershed on the distance to its border, seeded by its local
   maxima, where the waist between two basins is clearly narrower than the bodies; a basin is a
   white cell when it holds a nucleus (basins without one are red cells leaning on it, and are
   dropped); a nucleus is kept by its area in µm², counting only chromatin joined by chromatin or
   by the white cell's own cytoplasm (platelets, stain precipitate and debris are smaller, and
   platelets on a pile of red cells are joined only by red cells; a smudge cell, whose chromatin is
   pale but spread, is kept by a lower threshold over a larger area).
3. A cell belongs to the tile whose core holds its centre, so cells on tile borders are found once.

Any function ``(WholeSlide, DetectOptions) -> Detections`` can stand in for :func:`detect_cells`
(a learned detector, say): register it with :func:`milhema.slides.detectors.register_detector`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import measure
from skimage.feature import peak_local_max
from skimage.segmentation import watershed
from tqdm.auto import tqdm

from milhema.slides.calibrate import Calibration, calibrate, illumination, optical_density
from milhema.slides.wsi import WholeSlide

# 3: calibrated from each slide's own pixels (white point, vignetting, stain vectors, thresholds
# relative to the slide's nuclear-stain density) instead of absolute red-channel ODs.
# 4: a cell is a basin of its object holding a nucleus of chromatin joined through the cell's own
# material (red cells leaning on it are cut off; platelets on a pile of red cells are no nucleus).
# 5: lobes of a nucleus that a waist of the cell separates (coarse pixels) still make it a cell, and
# lobes of platelet size joined by their cell's cytoplasm are not dropped as platelets.
# 6: basins that each hold a nucleus are one cell when one piece of chromatin crosses between them
# at its full width (a band or lobed nucleus cut by its cell's waist at 0.08 µm/px).
# 7: the red cells' spread of hue without their noise (counted once, per pixel), so that a small
# nucleus under a quick stain keeps its edges.
# 8: a region whose dense pixels all have the red cells' hue (overlapping red cells, no nucleus) takes
# chromatin's hue from the slide's nuclear stain instead of counting every stained pixel as chromatin.
DETECTOR_VERSION = 8


@dataclass(frozen=True)
class DetectOptions:
    """Settings of the stain-based detector (sizes in µm; thresholds relative to the slide's calibration)."""

    body_mads: float = 3.0            # cell body: hue beyond the red cells' median + this × their MAD
    smooth_um: float = 0.8            # Gaussian smoothing before thresholding (removes granules, noise)
    min_nucleus_um2: float = 14.0     # smaller dark objects are platelets or stain precipitate
    smudge_ratio: float = 0.55        # paler chromatin (this × the nucleus threshold) still counts if it
    smudge_factor: float = 3.0        # ... covers smudge_factor × min_nucleus_um2
    min_cell_um2: float = 40.0        # smaller cells are debris
    max_cell_um2: float = 1200.0      # larger connected objects are split (several cells) or ignored
    split_min_um: float = 2.5         # touching cells: centres of their basins at least this far apart
    split_ratio: float = 0.9          # ... and the waist between them narrower than this × their radii
    red_cell_um: float = 10.0         # stained pixels this far from any chromatin are red cells (eosin)
    flat_field: bool = True           # correct vignetting per region (camera fields)
    candidate_mpp: float = 2.0        # coarsest pixel size (µm) used to find candidates
    candidate_ratio: float = 0.8      # candidates: chromatin above this × the nucleus threshold
    calibration_px: int = 1024        # side of the level-0 windows the slide is calibrated on ...
    calibration_windows: int = 3      # ... on a grid of this many × this many over the slide
    tile_px: int = 1024               # level-0 core of a refinement tile
    margin_um: float = 16.0           # read around each tile so that a border cell is whole
    workers: int = 1
    progress: bool = True


@dataclass
class Detections:
    """Detected cells of one slide, in level-0 pixels.

    ``centres`` float32 [N, 2] (x, y); ``bboxes`` int32 [N, 4] (x0, y0, x1, y1, exclusive ends);
    ``scores`` float32 [N] in [0, 1] (nuclear stain strength, 0.5 at the nucleus threshold); ``qc``
    numbers for the report; ``cell_types`` [N] from a detector that also classifies (external
    detections), else None; ``calibration`` what the slide was calibrated to
    (:meth:`milhema.slides.calibrate.Calibration.to_dict`; empty for a detector without one).
    """

    centres: np.ndarray
    bboxes: np.ndarray
    scores: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    cell_types: list[str] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, 4), np.int32), np.zeros(0, np.float32))

    def order(self) -> Detections:
        """Sorted top-to-bottom then left-to-right (stable cell order; nearby cells read together)."""
        idx = np.lexsort((self.centres[:, 0], self.centres[:, 1]))
        types = None if self.cell_types is None else [self.cell_types[i] for i in idx]
        return Detections(self.centres[idx], self.bboxes[idx], self.scores[idx], self.qc, types, self.calibration)

    def qc_line(self, slide_id: str) -> str:
        q = self.qc
        return (f"slide {slide_id}: {len(self)} cells in {q.get('scanned_mm2', 0):.2f} mm² scanned "
                f"of {q.get('slide_mm2', 0):.2f} mm² ({q.get('tiles', 0):.0f} tiles, {q.get('seconds', 0):.1f} s)")


@dataclass
class Segmentation:
    """The white cells of one region, as :func:`segment_regions` finds them.

    ``labels`` int32 [H, W]: 0 outside cells, k for cell k - 1; ``nucleus`` bool [H, W]: chromatin
    of those cells; ``centres`` float64 [n, 2] (x, y px), ``boxes`` int64 [n, 4] (x0, y0, x1, y1,
    exclusive ends), ``scores`` float64 [n] in [0, 1].
    """

    labels: np.ndarray
    nucleus: np.ndarray
    centres: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.centres.shape[0])


# --------------------------------------------------------------------------------------------
# Segmentation of one level-0 region
# --------------------------------------------------------------------------------------------

def _mad(values: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _merge_shallow(parts: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Merge watershed basins whose shared border is not a waist: where the distance to the outline
    on the border exceeds ``ratio`` × the smaller of the two basins' peaks (a big round cell)."""
    n = int(parts.max())
    peaks = ndi.maximum(dist, parts, index=np.arange(1, n + 1))
    parent = list(range(n + 1))

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    saddles: dict[tuple[int, int], float] = {}
    for axis in (0, 1):
        a = parts[:-1, :] if axis == 0 else parts[:, :-1]
        b = parts[1:, :] if axis == 0 else parts[:, 1:]
        d = np.minimum(dist[:-1, :], dist[1:, :]) if axis == 0 else np.minimum(dist[:, :-1], dist[:, 1:])
        edge = (a != b) & (a > 0) & (b > 0)
        for i, j, v in zip(a[edge], b[edge], d[edge], strict=True):
            key = (int(min(i, j)), int(max(i, j)))
            saddles[key] = max(saddles.get(key, 0.0), float(v))
    for (i, j), saddle in sorted(saddles.items(), key=lambda kv: -kv[1]):
        if saddle > ratio * min(peaks[i - 1], peaks[j - 1]):
            parent[root(j)] = root(i)
    lookup = np.array([root(k) for k in range(n + 1)])
    return lookup[parts]


def _joined(chromatin: np.ndarray, own: np.ndarray, need: float) -> np.ndarray:
    """The ``chromatin`` (bool) that lies in pieces of ``own`` (the white cells' own material)
    holding at least ``need`` px of it: the lobes of one nucleus are joined by chromatin or by their
    cell's cytoplasm, whereas platelets on neighbouring red cells are joined, if at all, only by
    red cells."""
    pieces, n = ndi.label(own | chromatin)
    if n == 0:
        return chromatin & False
    held = np.bincount(pieces[chromatin], minlength=n + 1)
    keep = held >= need
    keep[0] = False
    return chromatin & keep[pieces]


def _nucleated_pieces(region: np.ndarray, nucleus: np.ndarray, need: float, min_cell: float, peak_px: int,
                      ratio: float) -> list[np.ndarray]:
    """The white cells of one connected object (bool masks), each with at least ``need`` px of
    ``nucleus``.

    The object is cut into basins of the distance to its outline (one per round body: a white cell,
    a red cell, a pile of red cells) along its waists (:func:`_merge_shallow`). A white cell has its
    nucleus inside it, so a basin holding at least ``need`` px of chromatin is a cell; a basin with
    less joins the cell whose chromatin its own touches (a lobe cut off by the waist of a bilobed
    nucleus), or, joined with other such basins through touching chromatin, is a cell if together
    they reach ``need``. What remains holds no nucleus of its own: red cells leaning on a white cell,
    and piles of red cells whose platelets (each a speck of chromatin) add up to a nucleus's area
    only across several red cells. An object none of whose basins holds a nucleus but which holds
    one in all is one cell (lobes of a segmented nucleus on both sides of a waist, at coarse pixels).
    """
    dist = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    peaks = peak_local_max(dist, min_distance=peak_px, threshold_abs=peak_px, exclude_border=False)
    if len(peaks) < 2:
        return [region]
    markers = np.zeros(region.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    basins = _merge_shallow(watershed(-dist, markers, mask=region), dist, ratio)
    ids = np.unique(basins[basins > 0])
    if len(ids) < 2:
        return [region]
    index = np.zeros(int(basins.max()) + 1, np.int64)
    index[ids] = np.arange(len(ids))
    dense = index[basins]                  # basins numbered 0..n-1 (meaningful where region)
    held = np.bincount(dense[nucleus], minlength=len(ids)).astype(float)
    parent = list(range(len(ids)))

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    # Chromatin pieces that span basins tie them together, unless both already hold a nucleus and
    # the piece crosses between them only narrowly (two touching white cells whose nuclei touch stay
    # two cells; a band's or a lobed nucleus cut by the waist of its cell crosses at full width).
    pieces, n_pieces = ndi.label(nucleus)
    for piece in range(1, n_pieces + 1):
        mask = pieces == piece
        touched = np.unique(dense[mask])
        if len(touched) < 2:
            continue
        nucleated = [int(k) for k in touched if held[k] >= need]
        target = nucleated[0] if nucleated else int(touched[0])
        for k in touched:
            if k == target:
                continue
            if held[k] < need or not nucleated or _crossing(mask, dense, int(k), target) >= 0.8 * _width(mask):
                parent[root(int(k))] = root(target)
    roots = np.array([root(k) for k in range(len(ids))])
    total = np.bincount(roots, weights=held, minlength=len(ids))
    out = []
    for r in np.unique(roots):
        cell = region & np.isin(dense, np.flatnonzero(roots == r))
        if total[r] >= need and cell.sum() >= min_cell:
            out.append(cell)
    if not out and held.sum() >= need:
        # No basin holds a nucleus, the object does: a segmented nucleus whose lobes a waist of the
        # cell separated and no chromatin joins (each lobe a few px at 0.5 µm/px). Platelets are not
        # summed here: pieces of platelet size were dropped unless their cell's cytoplasm joins them.
        out.append(region)
    return out


def _width(mask: np.ndarray) -> float:
    """Typical width (px) of a bool shape: 2 × area / perimeter (a band's width; a disc's radius)."""
    return 2.0 * float(mask.sum()) / max(float(measure.perimeter(mask)), 1.0)


def _crossing(mask: np.ndarray, basins: np.ndarray, a: int, b: int) -> int:
    """How many px of ``mask`` in basin ``a`` have a 4-neighbour of ``mask`` in basin ``b``: the
    length of the cut the border between the two basins makes across the shape."""
    in_a, in_b = mask & (basins == a), mask & (basins == b)
    return int((in_a & ndi.binary_dilation(in_b)).sum())   # the default structure: 4-neighbours


def _stain_maps(rgb: np.ndarray, mpp: float, options: DetectOptions, cal: Calibration,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chromatin OD float32 [H, W], chromatin hue bool [H, W], cell-body mask bool [H, W]) of one region.

    Chromatin: OD along the slide's nuclear-stain vector. Body: stained pixels that are not red
    cells. Red cells are learnt from this region: the stained pixels ``red_cell_um`` from any
    chromatin. A pixel is cell body when its hue lies towards the chromatin's beyond the red cells'
    own spread of hue (pale lilac or blue cytoplasm), or when it is denser than two of the densest red
    cells stacked (pale red cells beside a well-stained white cell, as in rapid stains).
    """
    white = cal.white_array
    gain = illumination(rgb, white) if options.flat_field else None
    od = optical_density(rgb, white, gain)
    sigma = options.smooth_um / mpp
    for c in range(3):
        od[..., c] = ndi.gaussian_filter(od[..., c], sigma, truncate=3.0)
    nuclear = np.asarray(cal.nuclear, np.float32)
    chromatin = od @ nuclear
    norm = np.linalg.norm(od, axis=2)
    stained = norm > cal.stained_od
    is_chromatin = chromatin > cal.nucleus_od
    if is_chromatin.any():
        far = ndi.distance_transform_edt(~is_chromatin) * mpp > options.red_cell_um
    else:
        far = np.ones(chromatin.shape, bool)
    red = far & stained
    direction = od / np.maximum(norm, 1e-6)[..., None]
    # Hue along the axis from the red cells' direction (0) to the chromatin's (1). Chromatin's
    # direction: the dense pixels nearer in hue to the nuclear stain than to eosin (on a slide,
    # dense overlaps of red cells may outnumber the nuclei).
    eosin = np.asarray(cal.eosin, np.float32)
    chromatin_dir = nuclear
    if is_chromatin.any():
        dense = direction[is_chromatin]
        nuclear_like = dense @ nuclear > dense @ eosin
        if nuclear_like.sum() * mpp * mpp > options.min_nucleus_um2:
            dense = dense[nuclear_like]
        chromatin_dir = np.median(dense, axis=0)
    # Two red cells' worth of pixels (~44 µm² each) give a steady estimate of this region's red cells.
    enough_red = red.sum() * mpp * mpp > 90.0
    red_dir = np.median(direction[red], axis=0) if enough_red else eosin
    axis = chromatin_dir - red_dir
    if float(axis @ axis) < 1e-4:
        # The dense pixels have the red cells' hue: overlapping red cells, no nucleus. Chromatin
        # then has the hue of the slide's nuclear stain, and those overlaps are not chromatin.
        axis = nuclear - red_dir
    if float(axis @ axis) < 1e-4:   # red cells and the nuclear stain of one hue: nothing to tell them apart by
        return chromatin, np.ones(chromatin.shape, bool), stained
    hue = (direction - red_dir) @ (axis / float(axis @ axis))
    # A pixel's hue is noisy (the glass's OD noise over its own OD, along the hue axis), the more so
    # the paler it is.
    hue_noise = cal.noise_od / (np.maximum(norm, 1e-6) * float(np.sqrt(axis @ axis)))
    if enough_red:
        red_hue = hue[red]
        # The red cells' own spread of hue, their noise taken out in quadrature: pale red cells under
        # a quick stain and a yellow lamp are mostly noise in hue, and counting that noise here and
        # again per pixel below made the edges of a small nucleus too red to be chromatin.
        spread = math.sqrt(max(_mad(red_hue) ** 2 - float(np.median(hue_noise[red])) ** 2, 0.0))
        hue_threshold = float(np.median(red_hue)) + options.body_mads * max(spread, 0.02)
        # Denser than two of the densest red cells stacked: stain, not a pile of red cells.
        dense_od = 2.0 * float(np.percentile(norm[red], 99))
    else:
        hue_threshold, dense_od = 0.5, np.inf
    # Chromatin and cell body need the hue of chromatin by three sd of their own noise (dense
    # overlaps of red cells, platelets beside them and the rims of red cells do not count).
    chromatin_hue = hue > hue_threshold + 3.0 * hue_noise
    body = stained & (chromatin_hue | (norm > dense_od))
    return chromatin, chromatin_hue, body


def segment_regions(rgb: np.ndarray, mpp: float, options: DetectOptions | None = None,
                    calibration: Calibration | None = None) -> Segmentation:
    """White cells in one RGB uint8 [H, W, 3] region at ``mpp`` µm/px, with their masks.

    ``calibration``: the slide's (:func:`milhema.slides.calibrate.calibrate`); measured on the
    region itself when not given (a camera field or a crop).
    """
    options = options or DetectOptions()
    cal = calibration or calibrate(rgb, mpp, flat_field=options.flat_field)
    chromatin, chromatin_hue, body = _stain_maps(rgb, mpp, options, cal)
    is_chromatin = (chromatin > cal.nucleus_od) & chromatin_hue
    # The white cell's own material: chromatin and what has its hue. Red cells piled up are dense
    # enough to count as cell body, but they do not join a white cell's chromatin into one nucleus.
    cytoplasm = body & chromatin_hue
    # Chromatin specks smaller than half the smallest nucleus are platelets (2–3 µm): they do not
    # add up to a nucleus, even when a pile of red cells joins a few of them into one object.
    pieces, n_pieces = ndi.label(is_chromatin)
    if n_pieces:
        small = np.bincount(pieces.ravel()) < 0.5 * options.min_nucleus_um2 / (mpp * mpp)
        small[0] = False
        # ... unless their cell's cytoplasm joins them into a nucleus: at coarse pixels (0.5 µm/px)
        # each lobe of a segmented neutrophil is a piece of ~5 µm², under the platelet size.
        lobes = _joined(is_chromatin, cytoplasm, options.min_nucleus_um2 / (mpp * mpp))
        is_chromatin &= ~small[pieces] | lobes
    mask = body | is_chromatin
    own = cytoplasm | is_chromatin
    # Thin bridges of stain (fibrin, a red cell's rim) do not join a cell to its neighbours.
    mask = ndi.binary_opening(mask, _disk(max(1, round(0.5 / mpp)))) | is_chromatin
    labels, n = ndi.label(mask)
    h, w = chromatin.shape
    out = np.zeros((h, w), np.int32)
    nucleus_out = np.zeros((h, w), bool)
    empty = Segmentation(out, nucleus_out, np.zeros((0, 2)), np.zeros((0, 4), np.int64), np.zeros(0))
    if n == 0:
        return empty
    px_area = mpp * mpp
    min_cell = options.min_cell_um2 / px_area
    min_nucleus = options.min_nucleus_um2 / px_area
    max_cell = options.max_cell_um2 / px_area
    peak_px = max(1, int(options.split_min_um / mpp))
    centres, boxes, scores = [], [], []
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        region = ndi.binary_fill_holes(labels[window] == index)
        area = int(region.sum())
        if area < min_cell or area > 6 * max_cell:
            continue
        own_here = region & own[window]
        nucleus, need = _joined(region & is_chromatin[window], own_here, min_nucleus), min_nucleus
        if not nucleus.any():
            # A smudge cell: chromatin spread thin, pale but over a large area.
            need = options.smudge_factor * min_nucleus
            pale = region & chromatin_hue[window] & (chromatin[window] > options.smudge_ratio * cal.nucleus_od)
            nucleus = _joined(pale, own_here, need)
            if not nucleus.any():
                continue
        pieces = _nucleated_pieces(region, nucleus, need, min_cell, peak_px, options.split_ratio)
        y0, x0 = window[0].start, window[1].start
        for piece in pieces:
            if piece.sum() > max_cell:
                continue
            ys, xs = np.nonzero(piece)
            centres.append((x0 + xs.mean(), y0 + ys.mean()))
            boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
            # 0.5 at the slide's nucleus threshold, 1 at twice it: comparable across slides.
            scores.append(min(1.0, 0.5 * float(chromatin[window][piece & nucleus].mean()) / cal.nucleus_od))
            out[window][piece] = len(centres)
            nucleus_out[window] |= piece & nucleus
    if not centres:
        return empty
    return Segmentation(out, nucleus_out, np.array(centres), np.array(boxes, dtype=np.int64), np.array(scores))


def segment_cells(rgb: np.ndarray, mpp: float, options: DetectOptions | None = None,
                  calibration: Calibration | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White cells in one RGB uint8 [H, W, 3] region at ``mpp`` µm/px (:func:`segment_regions`
    without the masks).

    Returns centres float64 [n, 2] (x, y px in the region), bboxes int64 [n, 4] (x0, y0, x1, y1) and
    scores float64 [n].
    """
    found = segment_regions(rgb, mpp, options, calibration)
    return found.centres, found.boxes, found.scores


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return np.asarray(yy * yy + xx * xx <= radius * radius)


# --------------------------------------------------------------------------------------------
# Whole slide
# --------------------------------------------------------------------------------------------

def slide_calibration(slide: WholeSlide, options: DetectOptions | None = None) -> Calibration:
    """Calibrate ``slide`` on ``calibration_windows``² level-0 windows of ``calibration_px`` spread
    over it (the whole of level 0 when that is smaller): white point, stains, thresholds."""
    options = options or DetectOptions()
    width, height = slide.dimensions
    side_x, side_y = min(options.calibration_px, width), min(options.calibration_px, height)
    n = max(1, options.calibration_windows)
    xs = sorted({int(round((width - side_x) * (i + 0.5) / n)) for i in range(n)}) if width > side_x else [0]
    ys = sorted({int(round((height - side_y) * (i + 0.5) / n)) for i in range(n)}) if height > side_y else [0]
    windows = [slide.read(x, y, side_x, side_y) for y in ys for x in xs]
    return calibrate(windows, slide.mpp, flat_field=options.flat_field)


def _candidate_tiles(slide: WholeSlide, options: DetectOptions, cal: Calibration) -> list[tuple[int, int]]:
    """Top-left corners (level-0 px) of the refinement tiles that hold candidate cells."""
    level = slide.best_level(options.candidate_mpp)
    down = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    lmpp = slide.level_mpp(level)
    tile = options.tile_px
    n_x, n_y = -(-slide.dimensions[0] // tile), -(-slide.dimensions[1] // tile)
    marked = np.zeros((n_y, n_x), dtype=bool)
    chunk = 2048
    reach = options.margin_um / 2 / slide.mpp   # a candidate near a tile edge may belong to the neighbour
    min_px = max(1, int(0.5 * options.min_nucleus_um2 / (lmpp * lmpp)))
    white = cal.white_array
    nuclear = np.asarray(cal.nuclear, np.float32)
    for cy in range(0, height, chunk):
        for cx in range(0, width, chunk):
            w, h = min(chunk, width - cx), min(chunk, height - cy)
            rgb = slide.read(int(cx * down), int(cy * down), w, h, level)
            gain = illumination(rgb, white) if options.flat_field and level == 0 else None
            od = ndi.gaussian_filter(optical_density(rgb, white, gain) @ nuclear,
                                     max(0.5, options.smooth_um / lmpp), truncate=3.0)
            labels, n = ndi.label(od > cal.nucleus_od * options.candidate_ratio)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel())
            for index, window in enumerate(ndi.find_objects(labels), start=1):
                if window is None or sizes[index] < min_px:
                    continue
                x0 = (cx + window[1].start) * down - reach
                x1 = (cx + window[1].stop) * down + reach
                y0 = (cy + window[0].start) * down - reach
                y1 = (cy + window[0].stop) * down + reach
                marked[max(0, int(y0 // tile)):min(n_y, int(y1 // tile) + 1),
                       max(0, int(x0 // tile)):min(n_x, int(x1 // tile) + 1)] = True
    return [(int(x) * tile, int(y) * tile) for y, x in zip(*np.nonzero(marked), strict=True)]


def _detect_tile(args: tuple[WholeSlide, DetectOptions, Calibration, int, int],
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    slide, options, cal, tx, ty = args
    width, height = slide.dimensions
    margin = int(math.ceil(options.margin_um / slide.mpp))
    x0, y0 = max(0, tx - margin), max(0, ty - margin)
    x1 = min(width, tx + options.tile_px + margin)
    y1 = min(height, ty + options.tile_px + margin)
    rgb = slide.read(x0, y0, x1 - x0, y1 - y0)
    centres, boxes, scores = segment_cells(rgb, slide.mpp, options, cal)
    centres = centres + (x0, y0)
    boxes = boxes + (x0, y0, x0, y0)
    core = ((centres[:, 0] >= tx) & (centres[:, 0] < tx + options.tile_px)
            & (centres[:, 1] >= ty) & (centres[:, 1] < ty + options.tile_px))
    return centres[core], boxes[core], scores[core]


def detect_cells(slide: WholeSlide, options: DetectOptions | None = None) -> Detections:
    """Every white cell of ``slide``: level-0 centres, boxes and scores, with a QC summary and the
    slide's calibration (white point, stain vectors, thresholds, mpp)."""
    options = options or DetectOptions()
    start = time.perf_counter()
    cal = slide_calibration(slide, options)
    tiles = _candidate_tiles(slide, options, cal)
    jobs = [(slide, options, cal, x, y) for x, y in tiles]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(total=len(jobs), desc=f"detect {slide.slide_id}", unit="tile", leave=False,
               disable=None if options.progress else True)
    if options.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(options.workers) as pool:
            for part in pool.map(_detect_tile, jobs, chunksize=2):
                parts.append(part)
                bar.update(1)
    else:
        for job in jobs:
            parts.append(_detect_tile(job))
            bar.update(1)
    bar.close()
    width, height = slide.dimensions
    scanned = sum(min(options.tile_px, width - x) * min(options.tile_px, height - y) for x, y in tiles)
    qc = {"tiles": float(len(tiles)), "scanned_mm2": scanned * slide.mpp ** 2 / 1e6,
          "slide_mm2": width * height * slide.mpp ** 2 / 1e6, "seconds": time.perf_counter() - start}
    calibration = cal.to_dict()
    if not parts or sum(len(p[2]) for p in parts) == 0:
        out = Detections.empty()
        out.qc, out.calibration = qc, calibration
        return out
    centres = np.concatenate([p[0] for p in parts]).astype(np.float32)
    boxes = np.concatenate([p[1] for p in parts]).astype(np.int32)
    scores = np.concatenate([p[2] for p in parts]).astype(np.float32)
    return Detections(centres, boxes, scores, qc, calibration=calibration).order()


# --------------------------------------------------------------------------------------------
# Matching detections to truth
# --------------------------------------------------------------------------------------------

def match_points(truth: np.ndarray, found: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """One-to-one pairs (truth index, found index) closer than ``radius``, closest pairs first.

    truth [n, 2] and found [m, 2] in the same units as ``radius``.
    """
    from scipy.spatial import cKDTree

    if len(truth) == 0 or len(found) == 0:
        return []
    pairs = cKDTree(truth).query_ball_tree(cKDTree(found), radius)
    candidates = sorted((float(np.hypot(*(truth[i] - found[j]))), i, j) for i, js in enumerate(pairs) for j in js)
    used_t: set[int] = set()
    used_f: set[int] = set()
    matched = []
    for _, i, j in candidates:
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
            matched.append((i, j))
    return matched


def recall_precision(truth: np.ndarray, found: np.ndarray, radius: float) -> tuple[float, float, int]:
    """(recall, precision, matches) of ``found`` against ``truth`` within ``radius``."""
    n = len(match_points(truth, found, radius))
    return (n / len(truth) if len(truth) else 1.0), (n / len(found) if len(found) else 1.0), n
