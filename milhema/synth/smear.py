"""Whole-slide smear scans: a monolayer of red cells, platelets, precipitate and white cells at
known positions, written as a pyramidal, tiled TIFF that tiffslide / openslide-style readers open.

A slide is rendered block by block (one row of TIFF tiles at a time, a few tiles wide), so a
40,000 × 40,000 px slide never exists in memory. Every object draws its randomness from a generator
keyed by the object (red-cell lattice row, platelet grid square, white-cell index), not by the
block, so a block renders the same pixels whichever process renders it and objects that cross
block borders continue seamlessly. Lower pyramid levels are 4× box-filtered from the level above.

Positions are level-0 pixels (x right, y down); sizes in µm; ``mpp`` is µm per pixel.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tqdm.auto import tqdm

from milhema.synth.acquisition import Illumination
from milhema.synth.background import (
    _RBC_DIAMETER,
    _RBC_SPACING,
    _draw_platelet,
    _draw_precipitate,
    _draw_rbcs,
    _draw_rbcs_with,
    _keep_out,
    _rbc_params,
    compose,
)
from milhema.synth.cells import _render_cell, paste_cell
from milhema.synth.stain import Stain, _densities_to_od

TILE_PX = 512
LEVEL_FACTOR = 4
_SMALLEST_LEVEL_PX = 512        # stop adding levels once the whole slide fits in this
_BLOCK_TILES = 4                # tiles per rendered block (memory ~ 60 MB per worker at 512 px tiles)
_BLUR_MARGIN_PX = 8             # rendered around a block so that focus blur has no seams
_OBJECT_SQUARE_UM = 128.0       # platelets and precipitate are drawn per square of this side
_JPEG_QUALITY = 90

# Mean outer diameter (µm) of each simulated white-cell type: used to place cells before they are
# rendered (the rendered size varies ±15 %); measured on the renderer at 0.25 µm/px.
_DIAMETER_UM = {
    "neutrophil": 15.0, "band": 14.5, "lymphocyte": 9.7, "monocyte": 20.5, "eosinophil": 15.0,
    "basophil": 13.0, "blast": 17.5, "blast_auer": 17.0, "promyelocyte": 20.0,
    "hypogranular_neutrophil": 14.5, "pseudo_pelger": 13.0, "vacuolated_neutrophil": 15.0,
    "vacuolated_monocyte": 20.0, "reactive_lymphocyte": 18.0, "smudge": 18.0,
}
_STREAM_RBC, _STREAM_OBJECTS, _STREAM_CELL, _STREAM_NOISE, _STREAM_TINT = 11, 12, 13, 14, 15
TRUTH_HEADER = ("cell_id", "x", "y", "x0", "y0", "x1", "y1", "cell_type", "diagnostic")


@dataclass(frozen=True)
class PlacedCell:
    """A white cell to draw: its type, whether it carries the diagnosis, and its centre (level-0 px)."""

    cell_type: str
    diagnostic: bool
    x: float
    y: float


@dataclass(frozen=True)
class SmearSpec:
    """Everything that determines a slide's pixels."""

    width: int
    height: int
    mpp: float
    seed: tuple[int, ...]
    stain: Stain
    cells: tuple[PlacedCell, ...]
    tint: tuple[tuple[float, float, float, float], ...]   # (amplitude, fx, fy, phase) of slow stain waves
    light: Illumination | None = None          # lamp and vignetting; None = a white lamp of 255
    axis: tuple[float, float] | None = None    # optical axis (px) for vignetting; None = the image centre

    @cached_property
    def centres(self) -> np.ndarray:
        """float64 [n, 2] white-cell centres (x, y px)."""
        return np.array([(c.x, c.y) for c in self.cells], dtype=np.float64).reshape(-1, 2)

    @cached_property
    def radii(self) -> np.ndarray:
        """float64 [n] nominal white-cell radii (px)."""
        return np.array([_DIAMETER_UM.get(c.cell_type, 16.0) / 2.0 / self.mpp for c in self.cells])


def cell_rng(spec: SmearSpec, index: int) -> np.random.Generator:
    """The generator white cell ``index`` of ``spec`` is rendered from (whichever block draws it)."""
    return np.random.default_rng([*spec.seed, _STREAM_CELL, index])


def default_size(n_cells: int, mpp: float, um2_per_cell: float = 8000.0) -> int:
    """Side (px) of a square slide holding ``n_cells`` white cells at a typical smear density."""
    return max(1024, int(math.ceil(math.sqrt(n_cells * um2_per_cell) / mpp / TILE_PX)) * TILE_PX)


def plan_smear(cells: Sequence[tuple[str, bool]], width: int, height: int, mpp: float, seed: Sequence[int],
               stain: Stain, touching: float = 0.08) -> SmearSpec:
    """Place white cells uniformly over the slide, apart from each other, except a fraction
    ``touching`` that is put against an earlier cell (touching or overlapping by up to 20 %).

    Raises:
        ValueError: the cells do not fit on a slide this size.
    """
    rng = np.random.default_rng([*seed, 0])
    radius = np.array([_DIAMETER_UM.get(t, 16.0) / 2.0 / mpp for t, _ in cells])
    pts = np.zeros((len(cells), 2))
    gap = 6.0 / mpp
    for i in range(len(cells)):
        r = radius[i]
        lo = np.array([r + gap, r + gap])
        hi = np.array([width - r - gap, height - r - gap])
        if np.any(hi <= lo):
            raise ValueError(f"a {width}×{height} px slide is too small for a white cell")
        for attempt in range(400):
            if i and attempt < 20 and rng.random() < touching:
                j = int(rng.integers(0, i))
                angle = rng.uniform(0.0, 2 * math.pi)
                d = (radius[i] + radius[j]) * rng.uniform(0.8, 1.0)
                p = pts[j] + d * np.array([math.cos(angle), math.sin(angle)])
                near = np.delete(np.arange(i), j)
            else:
                p = rng.uniform(lo, hi)
                near = np.arange(i)
            if np.any(p < lo) or np.any(p > hi):
                continue
            dist = np.hypot(*(pts[near] - p).T) if near.size else np.zeros(0)
            if np.all(dist > radius[near] + r + gap):
                break
        else:
            raise ValueError(f"{len(cells)} white cells do not fit on a {width}×{height} px slide; "
                             "make it larger")
        pts[i] = p
    tint = []
    for _ in range(4):
        wavelength = rng.uniform(60.0, 600.0) / mpp
        angle = rng.uniform(0.0, math.pi)
        tint.append((float(rng.uniform(0.05, 0.12)), math.cos(angle) / wavelength, math.sin(angle) / wavelength,
                     float(rng.uniform(0.0, 2 * math.pi))))
    placed = tuple(PlacedCell(t, bool(d), float(x), float(y)) for (t, d), (x, y) in zip(cells, pts, strict=True))
    return SmearSpec(width, height, float(mpp), tuple(seed), stain, placed, tuple(tint))


# --------------------------------------------------------------------------------------------
# Rendering one block
# --------------------------------------------------------------------------------------------

def _rbc_rows(spec: SmearSpec, y0: float, y1: float) -> Iterator[tuple[np.random.Generator, np.ndarray]]:
    """(row generator, points [n, 2]) of every red-cell lattice row with centres in [y0, y1).

    The lattice is hexagonal with gaps and jitter, like :func:`~milhema.synth.background._rbc_positions`,
    but each row draws from its own generator so any band of rows can be made independently.
    """
    spacing = _RBC_SPACING / spec.mpp
    row_h = spacing * math.sqrt(3) / 2
    n_cols = int(spec.width / spacing) + 3
    for j in range(max(int(math.floor(y0 / row_h)) - 1, -1), int(math.ceil(y1 / row_h)) + 2):
        rng = np.random.default_rng([*spec.seed, _STREAM_RBC, j + 1])
        xs = (np.arange(-1, n_cols - 1) + 0.5 * (j % 2)) * spacing
        pts = np.stack([xs, np.full_like(xs, j * row_h)], axis=-1)
        pts += rng.normal(0.0, 0.16 * spacing, pts.shape)
        pts = pts[rng.random(pts.shape[0]) > 0.12]
        extra = pts[rng.random(pts.shape[0]) < 0.06]
        if extra.size:
            ang = rng.uniform(0.0, 2 * math.pi, extra.shape[0])
            d = rng.uniform(0.45, 0.8, extra.shape[0]) * _RBC_DIAMETER / spec.mpp
            pts = np.concatenate([pts, extra + np.stack([np.cos(ang) * d, np.sin(ang) * d], axis=-1)])
        for index in np.flatnonzero(np.abs(spec.centres[:, 1] - j * row_h) < 40.0 / spec.mpp):
            cx, cy = spec.centres[index]
            pts = _keep_out(pts, (cx, cy, spec.radii[index]), rng, _RBC_DIAMETER / 2 / spec.mpp)
        yield rng, pts


def _tint(spec: SmearSpec, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """Slow variation of stain thickness across the smear, float32 [h, w] around 1."""
    ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]
    out = np.ones((h, w), dtype=np.float64)
    for amp, fx, fy, phase in spec.tint:
        out += amp * np.cos(2 * math.pi * (fx * xs + fy * ys) + phase)
    return out.astype(np.float32)


def render_block(spec: SmearSpec, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """RGB uint8 [h, w, 3] of the slide region at (x0, y0), and the bounding boxes
    ``(index, x0, y0, x1, y1)`` (level-0 px, x1/y1 exclusive) of the white cells centred in it."""
    m = _BLUR_MARGIN_PX
    cx0, cy0, cw, ch = x0 - m, y0 - m, w + 2 * m, h + 2 * m
    mpp = spec.mpp
    reach = _RBC_DIAMETER / mpp
    eos = np.zeros((ch, cw), dtype=np.float32)
    for rng, pts in _rbc_rows(spec, cy0 - reach, cy0 + ch + reach):
        params = _rbc_params(pts.shape[0], rng)
        inside = ((pts[:, 0] > cx0 - reach) & (pts[:, 0] < cx0 + cw + reach)
                  & (pts[:, 1] > cy0 - reach) & (pts[:, 1] < cy0 + ch + reach))
        _draw_rbcs_with(eos, pts[inside] - (cx0, cy0), params.take(inside), mpp)
    od = _tint(spec, cx0, cy0, ch, cw)[..., None] * spec.stain.background_od
    od += eos[..., None] * spec.stain.eosin_od
    del eos
    square = _OBJECT_SQUARE_UM / mpp
    pad = 4.0 / mpp
    for gy in range(int((cy0 - pad) // square), int((cy0 + ch + pad) // square) + 1):
        for gx in range(int((cx0 - pad) // square), int((cx0 + cw + pad) // square) + 1):
            rng = np.random.default_rng([*spec.seed, _STREAM_OBJECTS, gy + 1_000_000, gx + 1_000_000])
            area = _OBJECT_SQUARE_UM ** 2
            for draw, per_um2 in ((_draw_platelet, 650.0), (_draw_precipitate, 5000.0)):
                xy = (np.array([gx, gy]) + rng.uniform(0.0, 1.0, (rng.poisson(area / per_um2), 2))) * square
                for x, y in xy:
                    draw(od, x - cx0, y - cy0, rng, spec.stain, mpp)
    boxes: list[tuple[int, ...]] = []
    half = 1.2 * spec.radii + 4
    near = ((spec.centres[:, 0] > cx0 - half) & (spec.centres[:, 0] < cx0 + cw + half)
            & (spec.centres[:, 1] > cy0 - half) & (spec.centres[:, 1] < cy0 + ch + half))
    for index in map(int, np.flatnonzero(near)):
        cell = spec.cells[index]
        rng = cell_rng(spec, index)
        r = _render_cell(cell.cell_type, rng, mpp)
        px, py = round(cell.x) - cx0, round(cell.y) - cy0
        if r.hug:
            layer = np.zeros((ch, cw), dtype=np.float32)
            _draw_rbcs(layer, np.array(r.hug) / mpp + np.array([px, py]), rng, mpp)
            od += layer[..., None] * spec.stain.eosin_od
        paste_cell(od, _densities_to_od(r.dens, spec.stain), r.cell > 0.5, (px, py), alpha=r.alpha)
        if x0 <= round(cell.x) < x0 + w and y0 <= round(cell.y) < y0 + h:
            rows = np.flatnonzero((r.cell > 0.5).any(axis=1))
            cols = np.flatnonzero((r.cell > 0.5).any(axis=0))
            hy, hx = r.cell.shape[0] // 2, r.cell.shape[1] // 2
            boxes.append((index, round(cell.x) - hx + int(cols[0]), round(cell.y) - hy + int(rows[0]),
                          round(cell.x) - hx + int(cols[-1]) + 1, round(cell.y) - hy + int(rows[-1]) + 1))
    noise_rng = np.random.default_rng([*spec.seed, _STREAM_NOISE, y0, x0])
    light = None
    if spec.light is not None:
        axis = spec.axis or (spec.width / 2.0, spec.height / 2.0)
        light = spec.light.gain(cx0, cy0, ch, cw, (spec.width, spec.height), axis)
    rgb = compose(od, noise_rng, spec.stain, light)
    return rgb[m:m + h, m:m + w], boxes


# --------------------------------------------------------------------------------------------
# Writing the pyramid
# --------------------------------------------------------------------------------------------

def _render_strip_block(args: tuple[SmearSpec, int, int, int, int]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    return render_block(*args)


def _tiles(image: np.ndarray, shape: tuple[int, ...] | None = None) -> Iterator[np.ndarray]:
    """Row-major TILE_PX tiles covering ``shape`` (default: the image's), padded with white."""
    height, width = (shape or image.shape)[:2]
    for y in range(0, height, TILE_PX):
        for x in range(0, width, TILE_PX):
            tile = image[y:y + TILE_PX, x:x + TILE_PX]
            if tile.shape[:2] != (TILE_PX, TILE_PX):
                padded = np.full((TILE_PX, TILE_PX, 3), 255, np.uint8)
                padded[:tile.shape[0], :tile.shape[1]] = tile
                tile = padded
            yield np.ascontiguousarray(tile)


def _reduce(block: np.ndarray) -> np.ndarray:
    """4× box filter of an RGB block whose sides are multiples of 4."""
    h, w = block.shape[0] // LEVEL_FACTOR, block.shape[1] // LEVEL_FACTOR
    return (block.reshape(h, LEVEL_FACTOR, w, LEVEL_FACTOR, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def write_smear(path: str | Path, spec: SmearSpec, *, workers: int = 1, progress: bool = False,
                jpeg_quality: int = _JPEG_QUALITY) -> list[tuple[object, ...]]:
    """Render ``spec`` into a pyramidal tiled JPEG TIFF at ``path`` and return one truth row per
    white cell: ``(cell_id, x, y, x0, y0, x1, y1, cell_type, diagnostic)`` in level-0 px.
    ``jpeg_quality`` (1-100) is that of every tile.

    Memory stays around (workers + 1) blocks plus the second pyramid level, which is kept in a
    temporary memory-mapped file next to ``path``. The file appears under its name only when complete.
    """
    path = Path(path)
    padded_w = -(-spec.width // TILE_PX) * TILE_PX
    padded_h = -(-spec.height // TILE_PX) * TILE_PX
    block_w = TILE_PX * _BLOCK_TILES
    jobs = [(spec, x, y, min(block_w, padded_w - x), TILE_PX)
            for y in range(0, padded_h, TILE_PX) for x in range(0, padded_w, block_w)]
    shapes = [(spec.height, spec.width)]
    while max(shapes[-1]) > _SMALLEST_LEVEL_PX:
        shapes.append((-(-shapes[-1][0] // LEVEL_FACTOR), -(-shapes[-1][1] // LEVEL_FACTOR)))
    boxes: dict[int, tuple[int, ...]] = {}
    tmp = path.with_name(f".{path.name}.tmp")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as scratch:
        level1 = None
        if len(shapes) > 1:
            level1 = np.lib.format.open_memmap(os.path.join(scratch, "level1.npy"), mode="w+", dtype=np.uint8,
                                               shape=(padded_h // LEVEL_FACTOR, padded_w // LEVEL_FACTOR, 3))
        bar = tqdm(total=len(jobs), desc=f"render {path.stem}", unit="block", disable=None if progress else True)

        def level0_tiles() -> Iterator[np.ndarray]:
            pool = ProcessPoolExecutor(workers) if workers > 1 else None
            results = pool.map(_render_strip_block, jobs) if pool else map(_render_strip_block, jobs)
            strip: list[np.ndarray] = []
            try:
                for (_, x, y, _, _), (rgb, found) in zip(jobs, results, strict=True):
                    boxes.update((b[0], b[1:]) for b in found)
                    if level1 is not None:
                        level1[y // LEVEL_FACTOR:(y + TILE_PX) // LEVEL_FACTOR,
                               x // LEVEL_FACTOR:(x + rgb.shape[1]) // LEVEL_FACTOR] = _reduce(rgb)
                    strip.append(rgb)
                    bar.update(1)
                    if x + rgb.shape[1] >= padded_w:
                        yield from _tiles(np.concatenate(strip, axis=1), (TILE_PX, spec.width))
                        strip = []
            finally:
                if pool:
                    pool.shutdown(cancel_futures=True)

        options: dict[str, Any] = {"tile": (TILE_PX, TILE_PX), "photometric": "rgb", "compression": "jpeg",
                                   "compressionargs": {"level": jpeg_quality}, "resolutionunit": "CENTIMETER"}
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            tif.write(level0_tiles(), shape=(spec.height, spec.width, 3), dtype=np.uint8, subifds=len(shapes) - 1,
                      resolution=(1e4 / spec.mpp, 1e4 / spec.mpp), software="milhema synth",
                      description=f"milhema simulated blood smear; mpp={spec.mpp}", **options)
            bar.close()
            level: np.ndarray | None = level1
            for k in range(1, len(shapes)):
                assert level is not None
                factor = LEVEL_FACTOR ** k
                tif.write(_tiles(level, shapes[k]), shape=(*shapes[k], 3), dtype=np.uint8, subfiletype=1,
                          resolution=(1e4 / (spec.mpp * factor), 1e4 / (spec.mpp * factor)), **options)
                if k + 1 < len(shapes):
                    level = _reduce_level(level)
    os.replace(tmp, path)
    return _truth_rows(spec, boxes)


def _truth_rows(spec: SmearSpec, boxes: dict[int, tuple[int, ...]]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for index, cell in enumerate(spec.cells):
        bx0, by0, bx1, by1 = boxes[index]
        rows.append((f"cell_{index:05d}", round(cell.x), round(cell.y), bx0, by0, bx1, by1, cell.cell_type,
                     int(cell.diagnostic)))
    return rows


def write_field(path: str | Path, spec: SmearSpec, jpeg_quality: int = 90) -> list[tuple[object, ...]]:
    """Render ``spec`` whole, as one photographed field of view, into an image file at ``path``
    (JPEG at ``jpeg_quality``, or PNG when it is 0) and return its truth rows as :func:`write_smear`
    does, in pixels of the field. Meant for camera-sized fields (a few Mpx): the field is one block.
    """
    from PIL import Image

    path = Path(path)
    rgb, found = render_block(spec, 0, 0, spec.width, spec.height)
    tmp = path.with_name(f".{path.name}.tmp")
    if jpeg_quality:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=int(jpeg_quality))
    else:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, path)
    return _truth_rows(spec, {b[0]: b[1:] for b in found})


def _reduce_level(level: np.ndarray) -> np.ndarray:
    """The next pyramid level (in memory: it is at most 1/16 of the level-1 size), padded to tiles."""
    h = -(-level.shape[0] // LEVEL_FACTOR)
    w = -(-level.shape[1] // LEVEL_FACTOR)
    out = np.full((-(-h // TILE_PX) * TILE_PX, -(-w // TILE_PX) * TILE_PX, 3), 255, np.uint8)
    step = LEVEL_FACTOR * 256
    for y in range(0, level.shape[0], step):
        chunk = np.asarray(level[y:y + step])
        ch = chunk.shape[0] - chunk.shape[0] % LEVEL_FACTOR
        cw = chunk.shape[1] - chunk.shape[1] % LEVEL_FACTOR
        small = _reduce(chunk[:ch, :cw])
        out[y // LEVEL_FACTOR:y // LEVEL_FACTOR + small.shape[0], :small.shape[1]] = small
    return out
