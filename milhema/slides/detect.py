"""White-cell detection on whole-slide smears, without ever loading level 0 whole.

1. Candidates: a low-resolution level (~1–2 µm/px) is read in chunks; pixels dark in the red
   channel (the nuclear stain, azure/methylene blue, absorbs red; red cells barely do) mark the
   level-0 tiles worth a closer look.
2. Refinement: each marked tile (1024 px plus a margin that holds any white cell) is read at level 0
   in a worker process. Cells are segmented from the red-channel optical density: a low threshold
   gives the cell (nucleus + basophilic cytoplasm), a high one the nucleus; touching cells are split
   by a watershed on the distance to the cell border, seeded by its local maxima, where the waist
   between two basins is clearly narrower than the cells; objects are kept by
   nucleus area in µm² (platelets, stain precipitate and debris are smaller; a smudge cell, whose
   chromatin is pale but spread, is kept by a lower threshold over a larger area).
3. A cell belongs to the tile whose core holds its centre, so cells on tile borders are found once.

Any function ``(WholeSlide, DetectOptions) -> Detections`` can stand in for :func:`detect_cells`
(a learned detector, say): register it with :func:`milhema.slides.detectors.register_detector`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed
from tqdm.auto import tqdm

from milhema.slides.wsi import WholeSlide

DETECTOR_VERSION = 2
# Red-channel OD of one grey level, computed once: od = -ln((value + 1) / 256).
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


@dataclass(frozen=True)
class DetectOptions:
    """Settings of the stain-based detector (sizes in µm, optical densities in natural-log units)."""

    cell_od: float = 0.04             # red-channel OD not explained by eosin: a white cell's body
    nucleus_od: float = 0.40          # ... and above which it is nuclear chromatin
    smooth_um: float = 0.8            # Gaussian smoothing before thresholding (removes granules, noise)
    min_nucleus_um2: float = 14.0     # smaller dark objects are platelets or stain precipitate
    smudge_od: float = 0.22           # paler chromatin still counts if it covers smudge_factor × that area
    smudge_factor: float = 3.0
    min_cell_um2: float = 40.0        # smaller cells are debris
    max_cell_um2: float = 1200.0      # larger connected objects are split (several cells) or ignored
    split_min_um: float = 2.5         # touching cells: centres of their basins at least this far apart
    split_ratio: float = 0.9          # ... and the waist between them narrower than this × their radii
    candidate_mpp: float = 2.0        # coarsest pixel size (µm) used to find candidates
    tile_px: int = 1024               # level-0 core of a refinement tile
    margin_um: float = 16.0           # read around each tile so that a border cell is whole
    workers: int = 1
    progress: bool = True


@dataclass
class Detections:
    """Detected cells of one slide, in level-0 pixels.

    ``centres`` float32 [N, 2] (x, y); ``bboxes`` int32 [N, 4] (x0, y0, x1, y1, exclusive ends);
    ``scores`` float32 [N] in [0, 1] (nuclear stain strength); ``qc`` numbers for the report;
    ``cell_types`` [N] from a detector that also classifies (external detections), else None.
    """

    centres: np.ndarray
    bboxes: np.ndarray
    scores: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    cell_types: list[str] | None = None

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, 4), np.int32), np.zeros(0, np.float32))

    def order(self) -> Detections:
        """Sorted top-to-bottom then left-to-right (stable cell order; nearby cells read together)."""
        idx = np.lexsort((self.centres[:, 0], self.centres[:, 1]))
        types = None if self.cell_types is None else [self.cell_types[i] for i in idx]
        return Detections(self.centres[idx], self.bboxes[idx], self.scores[idx], self.qc, types)

    def qc_line(self, slide_id: str) -> str:
        q = self.qc
        return (f"slide {slide_id}: {len(self)} cells in {q.get('scanned_mm2', 0):.2f} mm² scanned "
                f"of {q.get('slide_mm2', 0):.2f} mm² ({q.get('tiles', 0):.0f} tiles, {q.get('seconds', 0):.1f} s)")


# --------------------------------------------------------------------------------------------
# Segmentation of one level-0 region
# --------------------------------------------------------------------------------------------

def _eosin_ratio(od_r: np.ndarray, od_g: np.ndarray, default: float = 0.18) -> float:
    """Red/green OD ratio of the eosin stain, measured on this region's red cells."""
    red_cells = (od_g > 0.25) & (od_r < 0.3)
    if red_cells.sum() < 500:
        return default
    return float(np.median(od_r[red_cells] / od_g[red_cells]))


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


def segment_cells(rgb: np.ndarray, mpp: float, options: DetectOptions | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White cells in one RGB uint8 [H, W, 3] region at ``mpp`` µm/px.

    The cell body is the red-channel OD left after removing what the slide's eosin (red cells)
    explains, so pale neutrophil cytoplasm counts and red cells do not; the nucleus is the raw
    red-channel OD above ``nucleus_od``.

    Returns centres float64 [n, 2] (x, y px in the region), bboxes int64 [n, 4] (x0, y0, x1, y1) and
    scores float64 [n].
    """
    options = options or DetectOptions()
    od_r = _OD_LUT[rgb[..., 0]]
    od_g = _OD_LUT[rgb[..., 1]]
    sigma = options.smooth_um / mpp
    body_od = ndi.gaussian_filter(od_r - _eosin_ratio(od_r, od_g) * od_g, sigma, truncate=3.0)
    del od_g
    nuclear = ndi.gaussian_filter(od_r, sigma, truncate=3.0)
    labels, n = ndi.label(body_od > options.cell_od)
    empty = np.zeros((0, 2)), np.zeros((0, 4), np.int64), np.zeros(0)
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
        nucleus = region & (nuclear[window] > options.nucleus_od)
        if nucleus.sum() < min_nucleus:
            # A smudge cell: chromatin spread thin, pale but over a large area.
            nucleus = region & (nuclear[window] > options.smudge_od)
            if nucleus.sum() < options.smudge_factor * min_nucleus:
                continue
        pieces = [region]
        # Touching cells: one basin per cell of the distance to the outline, split along the waist.
        # Kept only if every piece is a plausible cell, so an elongated cell is not cut in two.
        dist = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        peaks = peak_local_max(dist, min_distance=peak_px, threshold_abs=peak_px, exclude_border=False)
        markers = np.zeros(region.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        n_markers = len(peaks)
        if n_markers > 1:
            parts = _merge_shallow(watershed(-dist, markers, mask=region), dist, options.split_ratio)
            split = [parts == k for k in np.unique(parts[parts > 0])]
            if len(split) > 1 and all(p.sum() >= min_cell and (p & nucleus).sum() >= min_nucleus for p in split):
                pieces = split
        y0, x0 = window[0].start, window[1].start
        for piece in pieces:
            if piece.sum() > max_cell:
                continue
            ys, xs = np.nonzero(piece)
            centres.append((x0 + xs.mean(), y0 + ys.mean()))
            boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
            scores.append(min(1.0, float(nuclear[window][piece & nucleus].mean())))
    if not centres:
        return empty
    return np.array(centres), np.array(boxes, dtype=np.int64), np.array(scores)


# --------------------------------------------------------------------------------------------
# Whole slide
# --------------------------------------------------------------------------------------------

def _candidate_tiles(slide: WholeSlide, options: DetectOptions) -> list[tuple[int, int]]:
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
    for cy in range(0, height, chunk):
        for cx in range(0, width, chunk):
            w, h = min(chunk, width - cx), min(chunk, height - cy)
            rgb = slide.read(int(cx * down), int(cy * down), w, h, level)
            od = ndi.gaussian_filter(_OD_LUT[rgb[..., 0]], max(0.5, options.smooth_um / lmpp), truncate=3.0)
            labels, n = ndi.label(od > options.nucleus_od * 0.8)
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


def _detect_tile(args: tuple[WholeSlide, DetectOptions, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    slide, options, tx, ty = args
    width, height = slide.dimensions
    margin = int(math.ceil(options.margin_um / slide.mpp))
    x0, y0 = max(0, tx - margin), max(0, ty - margin)
    x1 = min(width, tx + options.tile_px + margin)
    y1 = min(height, ty + options.tile_px + margin)
    rgb = slide.read(x0, y0, x1 - x0, y1 - y0)
    centres, boxes, scores = segment_cells(rgb, slide.mpp, options)
    centres = centres + (x0, y0)
    boxes = boxes + (x0, y0, x0, y0)
    core = ((centres[:, 0] >= tx) & (centres[:, 0] < tx + options.tile_px)
            & (centres[:, 1] >= ty) & (centres[:, 1] < ty + options.tile_px))
    return centres[core], boxes[core], scores[core]


def detect_cells(slide: WholeSlide, options: DetectOptions | None = None) -> Detections:
    """Every white cell of ``slide``: level-0 centres, boxes and scores, with a QC summary."""
    options = options or DetectOptions()
    start = time.perf_counter()
    tiles = _candidate_tiles(slide, options)
    jobs = [(slide, options, x, y) for x, y in tiles]
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
    if not parts or sum(len(p[2]) for p in parts) == 0:
        out = Detections.empty()
        out.qc = qc
        return out
    centres = np.concatenate([p[0] for p in parts]).astype(np.float32)
    boxes = np.concatenate([p[1] for p in parts]).astype(np.int32)
    scores = np.concatenate([p[2] for p in parts]).astype(np.float32)
    return Detections(centres, boxes, scores, qc).order()


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
